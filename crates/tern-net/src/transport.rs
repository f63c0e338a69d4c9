//! The two transports behind one interface: QUIC (quinn, BBR, one stream per
//! engine worker) and TCP (BBR where the kernel has it) with one TLS 1.3
//! connection per engine worker.
//! Either way a client gets [`Stream`]s from a [`Connector`], and a server
//! hands each accepted stream to a blocking handler.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;

use crate::error::{NetError, Result};
use crate::identity::fingerprint;
use crate::path::{tcp_report, tune_tcp, PathReport, TcpConn};
use crate::stream::Stream;

/// Which transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS over several TCP connections.
    Tcp,
}

impl Transport {
    /// Its name in messages and summaries.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

/// Receive window of one QUIC stream. quinn closes the whole connection
/// ("too many gaps in stream buffer") once a stream's reassembly buffer
/// holds more than 1024 separate pieces. When a drop-tail queue overflows
/// (BBR's start-up overshoots by design) every other packet can be lost, so
/// a window must hold fewer than 2048 packets: 2 MiB of ~1,200-byte frames
/// is 1,792. Found with bench/wan.sh on the `far` profile, where a 16 MiB
/// window failed every run; throughput comes from streams in parallel
/// (2 MiB per stream is 112 Mbit/s at 150 ms of RTT).
const QUIC_STREAM_WINDOW: u32 = 2 << 20;

/// A QUIC peer silent this long is gone: three missed keep-alives (sent
/// every 5 s). A client killed without a close (SIGKILL, a lost link) sends
/// none, and until then the daemon keeps its files locked.
pub const QUIC_IDLE: Duration = Duration::from_secs(15);

/// QUIC settings: BBR, per-stream windows quinn can reassemble (above), and
/// a connection window big enough for a fast, long path (64 MiB covers
/// 1 Gbit/s at 500 ms of RTT).
fn quic_transport(streams: u32, idle: Duration) -> Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t.stream_receive_window(quinn::VarInt::from_u32(QUIC_STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(streams));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    let idle = quinn::IdleTimeout::try_from(idle).map_err(|e| NetError::Config(format!("idle timeout: {e}")))?;
    t.max_idle_timeout(Some(idle));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    Ok(t)
}

/// Socket buffer size asked for on QUIC's UDP socket.
const UDP_BUFFER: usize = 16 << 20;

/// A UDP socket with large kernel buffers. The default receive buffer
/// (208 KiB on most Linux systems) overflows within a millisecond at
/// gigabit rates whenever the receiving process is not scheduled: measured
/// on loopback, four packets in ten were dropped and sent again. As root the
/// system cap (net.core.rmem_max) is overridden; otherwise the kernel gives
/// what the cap allows, and a warning says how to raise it.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let sock = std::net::UdpSocket::bind(addr)?;
    let fd = sock.as_raw_fd();
    let set = |opt: libc::c_int, size: usize| -> bool {
        let v = size as libc::c_int;
        // SAFETY: setsockopt with a pointer to a c_int of the stated size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    let get = |opt: libc::c_int| -> usize {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into a c_int with its size.
        let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
        if r == 0 {
            v.max(0) as usize
        } else {
            0
        }
    };
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set(force, UDP_BUFFER) {
            set(plain, UDP_BUFFER);
        }
    }
    // Linux reports twice the size set (it counts its bookkeeping).
    let rcv = get(libc::SO_RCVBUF) / 2;
    if rcv < UDP_BUFFER / 4 {
        tracing::warn!(
            got = rcv,
            wanted = UDP_BUFFER,
            "small UDP receive buffer: QUIC may drop packets at high rates; raise net.core.rmem_max"
        );
    } else {
        tracing::debug!(rcvbuf = rcv, sndbuf = get(libc::SO_SNDBUF) / 2, "UDP socket buffers");
    }
    Ok(sock)
}

fn quic_err(e: impl std::fmt::Display) -> NetError {
    NetError::Quic(e.to_string())
}

/// Opens streams to one server.
pub struct Connector {
    rt: Handle,
    kind: Transport,
    addr: SocketAddr,
    timeout: Duration,
    tls: Arc<rustls::ClientConfig>,
    quic: Option<(quinn::Endpoint, quinn::Connection)>,
    /// The server's certificate seen on the first connection; every later
    /// TCP connection must present the same one.
    cert: Vec<u8>,
    /// Every TCP connection made, for the path report.
    tcp_conns: Mutex<Vec<Arc<TcpConn>>>,
    /// Streams opened on the QUIC connection.
    quic_streams: AtomicU64,
}

impl Connector {
    /// Connects to `addr` (one QUIC connection, or a first TCP connection
    /// whose stream is returned too).
    pub fn connect(
        rt: Handle,
        kind: Transport,
        addr: SocketAddr,
        tls: rustls::ClientConfig,
        timeout: Duration,
    ) -> Result<(Connector, Stream)> {
        Connector::connect_over(rt, kind, addr, tls, timeout, None)
    }

    /// Like [`Connector::connect`]; over TCP, the first TLS session runs on
    /// `tcp` when given (a connection already made to `addr`, as the path
    /// probe leaves one), which saves its round trip.
    pub fn connect_over(
        rt: Handle,
        kind: Transport,
        addr: SocketAddr,
        tls: rustls::ClientConfig,
        timeout: Duration,
        tcp: Option<std::net::TcpStream>,
    ) -> Result<(Connector, Stream)> {
        let tls = Arc::new(tls);
        match kind {
            Transport::Tcp => {
                let (stream, cert, tcp) = rt.block_on(tcp_connect(&rt, addr, tls.clone(), timeout, tcp))?;
                let c = Connector {
                    rt,
                    kind,
                    addr,
                    timeout,
                    tls,
                    quic: None,
                    cert,
                    tcp_conns: Mutex::new(vec![tcp]),
                    quic_streams: AtomicU64::new(0),
                };
                Ok((c, stream))
            }
            Transport::Quic => {
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls.clone()).map_err(quic_err)?;
                let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
                cfg.transport_config(Arc::new(quic_transport(256, QUIC_IDLE)?));
                let bind: SocketAddr = if addr.is_ipv6() {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                };
                let conn = rt.block_on(async {
                    let mut ep = quinn::Endpoint::new(
                        quinn::EndpointConfig::default(),
                        None,
                        udp_socket(bind)?,
                        Arc::new(quinn::TokioRuntime),
                    )?;
                    ep.set_default_client_config(cfg);
                    let connecting = ep.connect(addr, "tern").map_err(quic_err)?;
                    let conn = tokio::time::timeout(timeout, connecting)
                        .await
                        .map_err(|_| NetError::Timeout(timeout.as_secs()))?
                        .map_err(quic_err)?;
                    Ok::<_, NetError>((ep, conn))
                })?;
                let cert = peer_cert(conn.1.peer_identity()).ok_or_else(|| quic_err("server sent no certificate"))?;
                let c = Connector {
                    rt,
                    kind,
                    addr,
                    timeout,
                    tls,
                    quic: Some(conn),
                    cert,
                    tcp_conns: Mutex::new(Vec::new()),
                    quic_streams: AtomicU64::new(0),
                };
                let s = c.open()?;
                Ok((c, s))
            }
        }
    }

    /// The transport in use.
    pub fn kind(&self) -> Transport {
        self.kind
    }

    /// The server's certificate (DER).
    pub fn server_cert(&self) -> &[u8] {
        &self.cert
    }

    /// Smoothed round-trip time, where the transport measures it.
    pub fn rtt(&self) -> Option<Duration> {
        self.quic.as_ref().map(|(_, c)| c.rtt())
    }

    /// Opens one more stream.
    pub fn open(&self) -> Result<Stream> {
        match &self.quic {
            Some((_, conn)) => {
                let t = self.timeout;
                let (send, recv) = self
                    .rt
                    .block_on(async move { tokio::time::timeout(t, conn.open_bi()).await })
                    .map_err(|_| NetError::Timeout(self.timeout.as_secs()))?
                    .map_err(quic_err)?;
                self.quic_streams.fetch_add(1, Ordering::Relaxed);
                Ok(Stream::new(
                    self.rt.clone(),
                    Box::pin(recv),
                    Box::pin(send),
                    self.timeout,
                ))
            }
            None => {
                let (s, cert, tcp) =
                    self.rt
                        .block_on(tcp_connect(&self.rt, self.addr, self.tls.clone(), self.timeout, None))?;
                if let Ok(mut c) = self.tcp_conns.lock() {
                    c.push(tcp);
                }
                if cert != self.cert {
                    return Err(NetError::Trust(format!(
                        "{}: the server presented a different certificate on a second connection",
                        self.addr
                    )));
                }
                Ok(s)
            }
        }
    }

    /// What the transport has seen of the path so far.
    pub fn path_report(&self) -> PathReport {
        match &self.quic {
            Some((_, conn)) => {
                let st = conn.stats();
                PathReport {
                    transport: "quic".into(),
                    streams: self.quic_streams.load(Ordering::Relaxed),
                    rtt_ms: Some(st.path.rtt.as_secs_f64() * 1e3),
                    congestion: "bbr".into(),
                    packets_sent: st.path.sent_packets,
                    packets_lost: st.path.lost_packets,
                    wire_bytes_sent: st.udp_tx.bytes,
                    wire_bytes_received: st.udp_rx.bytes,
                    ..Default::default()
                }
            }
            None => {
                let conns = self.tcp_conns.lock().map(|c| c.clone()).unwrap_or_default();
                tcp_report(&conns)
            }
        }
    }

    /// Closes the QUIC connection (TCP streams close as they are dropped).
    pub fn close(&self) {
        if let Some((ep, conn)) = &self.quic {
            let st = conn.stats();
            tracing::debug!(
                mtu = st.path.current_mtu,
                rtt_us = st.path.rtt.as_micros() as u64,
                sent_packets = st.path.sent_packets,
                lost_packets = st.path.lost_packets,
                udp_tx_datagrams = st.udp_tx.datagrams,
                udp_tx_ios = st.udp_tx.ios,
                udp_rx_datagrams = st.udp_rx.datagrams,
                "QUIC connection statistics"
            );
            // Every request has had its reply: the close only tells the
            // server to free the connection now rather than at its idle
            // timeout. The endpoint sends it at once; waiting for the
            // whole draining period (three probe timeouts, 80 ms on
            // loopback) would only delay the exit. A few round trips let
            // it go out.
            let rtt = conn.rtt();
            conn.close(quinn::VarInt::from_u32(0), b"done");
            let wait = (rtt * 3).clamp(Duration::from_millis(5), Duration::from_secs(2));
            let _ = self
                .rt
                .block_on(async move { tokio::time::timeout(wait, ep.wait_idle()).await });
        }
    }
}

async fn tcp_connect(
    rt: &Handle,
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    made: Option<std::net::TcpStream>,
) -> Result<(Stream, Vec<u8>, Arc<TcpConn>)> {
    let mut conn = None;
    let fut = async {
        let tcp = match made {
            Some(t) => {
                t.set_nonblocking(true)?;
                TcpStream::from_std(t)?
            }
            None => TcpStream::connect(addr).await.map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => NetError::Refused(addr),
                _ => NetError::Io(e),
            })?,
        };
        tcp.set_nodelay(true)?;
        conn = Some(TcpConn::new(tcp.as_raw_fd()));
        let name = ServerName::try_from("tern").map_err(|e| NetError::Tls(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await?;
        Ok::<_, NetError>(tls)
    };
    let tls = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| NetError::Timeout(timeout.as_secs()))??;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| NetError::Tls("server sent no certificate".into()))?;
    let conn = conn.ok_or_else(|| NetError::Tls("no TCP connection".into()))?;
    let (r, w) = tokio::io::split(tls);
    let stream = Stream::new(rt.clone(), Box::pin(r), Box::pin(w), timeout).with_tcp(conn.clone());
    Ok((stream, cert, conn))
}

fn peer_cert(identity: Option<Box<dyn std::any::Any>>) -> Option<Vec<u8>> {
    let certs = identity?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    certs.first().map(|c| c.to_vec())
}

/// Who is on the other end of an accepted stream.
#[derive(Debug, Clone)]
pub struct Peer {
    /// Address.
    pub addr: SocketAddr,
    /// Fingerprint of the client's certificate, if it presented one.
    pub client: Option<String>,
    /// Transport.
    pub transport: Transport,
    /// Identifies the connection the stream came on (for logs).
    pub conn_id: u64,
}

/// Limits a server applies to each client.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time allowed for the TLS/QUIC handshake.
    pub handshake: Duration,
    /// Time a stream may stay silent.
    pub idle: Duration,
    /// Concurrent streams per QUIC connection.
    pub streams_per_conn: u32,
    /// Concurrent connections (TCP connections and QUIC connections).
    pub max_conns: usize,
    /// Files all clients' transfers may hold open at once; None for half
    /// the process's open-file limit (see `tern_core::open_file_budget`).
    pub open_files: Option<usize>,
}

/// What the server does with each accepted stream (on a blocking thread).
pub type Handler = Arc<dyn Fn(Stream, Peer) + Send + Sync>;

/// A bound TCP listener and QUIC endpoint (the same port number).
pub struct Listener {
    tcp: TcpListener,
    quic: quinn::Endpoint,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
}

impl Listener {
    /// Binds TCP and UDP on `addr` (port 0: a free port, the same for both).
    /// `reset_key` keys QUIC's stateless resets; derived from the daemon's
    /// identity, it survives a restart, so clients of the previous process
    /// learn at once that their connection is gone instead of waiting for
    /// their idle timeout.
    pub async fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        limits: Limits,
        reset_key: [u8; 32],
    ) -> Result<Listener> {
        let tls = Arc::new(tls);
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| NetError::Config(format!("cannot listen on {addr} (TCP): {e}")))?;
        let local = tcp.local_addr()?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls.clone()).map_err(quic_err)?;
        let mut qcfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        qcfg.transport_config(Arc::new(quic_transport(
            limits.streams_per_conn,
            QUIC_IDLE.min(limits.idle),
        )?));
        // The connection-ID check must survive the restart too: packets for
        // an unknown connection are answered with a reset only if their
        // connection ID is one this endpoint could have issued.
        let mut ecfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset_key)));
        let cid_key = u64::from_le_bytes([
            reset_key[0],
            reset_key[1],
            reset_key[2],
            reset_key[3],
            reset_key[4],
            reset_key[5],
            reset_key[6],
            reset_key[7],
        ]);
        ecfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        let quic = udp_socket(local)
            .and_then(|sock| quinn::Endpoint::new(ecfg, Some(qcfg), sock, Arc::new(quinn::TokioRuntime)))
            .map_err(|e| NetError::Config(format!("cannot listen on {local} (UDP): {e}")))?;
        Ok(Listener { tcp, quic, tls, limits })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.tcp.local_addr()?)
    }

    /// Accepts connections until `stop` turns true, handing every stream to
    /// `handler` on a blocking thread.
    pub async fn run(self, handler: Handler, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Listener { tcp, quic, tls, limits } = self;
        let conns = Arc::new(tokio::sync::Semaphore::new(limits.max_conns));
        let mut next_id = 0u64;
        loop {
            next_id += 1;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                r = tcp.accept() => {
                    let (sock, peer) = match r {
                        Ok(x) => x,
                        Err(e) => { tracing::warn!(error = %e, "accept failed"); continue; }
                    };
                    let Ok(permit) = conns.clone().try_acquire_owned() else {
                        tracing::warn!(%peer, "too many connections; refused");
                        continue;
                    };
                    let (tls, limits, handler, id) = (tls.clone(), limits.clone(), handler.clone(), next_id);
                    tokio::spawn(async move {
                        let _permit = permit;
                        if let Err(e) = tcp_conn(sock, peer, tls, &limits, handler, id).await {
                            tracing::info!(%peer, error = %e, "TCP connection failed");
                        }
                    });
                }
                c = quic.accept() => {
                    let Some(incoming) = c else { break };
                    let Ok(permit) = conns.clone().try_acquire_owned() else {
                        tracing::warn!(peer = %incoming.remote_address(), "too many connections; refused");
                        incoming.refuse();
                        continue;
                    };
                    let (limits, handler, id) = (limits.clone(), handler.clone(), next_id);
                    tokio::spawn(async move {
                        let _permit = permit;
                        let peer = incoming.remote_address();
                        if let Err(e) = quic_conn(incoming, &limits, handler, id).await {
                            tracing::info!(%peer, error = %e, "QUIC connection ended");
                        }
                    });
                }
            }
        }
        quic.close(quinn::VarInt::from_u32(1), b"server shutting down");
    }
}

async fn tcp_conn(
    sock: TcpStream,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: &Limits,
    handler: Handler,
    conn_id: u64,
) -> Result<()> {
    sock.set_nodelay(true)?;
    tune_tcp(sock.as_raw_fd());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let s = tokio::time::timeout(limits.handshake, async {
        // A client choosing its transport connects and closes without a
        // byte (`remote::probe_path`): not a failure worth a log line.
        if sock.peek(&mut [0u8]).await? == 0 {
            return Ok(None);
        }
        acceptor.accept(sock).await.map(Some)
    })
    .await
    .map_err(|_| NetError::Timeout(limits.handshake.as_secs()))??;
    let Some(s) = s else {
        tracing::debug!(peer = %addr, "closed before sending a byte (a path probe)");
        return Ok(());
    };
    let client = s
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| fingerprint(c));
    let peer = Peer {
        addr,
        client,
        transport: Transport::Tcp,
        conn_id,
    };
    let (r, w) = tokio::io::split(s);
    let stream = Stream::new(Handle::current(), Box::pin(r), Box::pin(w), limits.idle);
    tokio::task::spawn_blocking(move || handler(stream, peer))
        .await
        .map_err(|e| NetError::Config(format!("handler failed: {e}")))
}

async fn quic_conn(incoming: quinn::Incoming, limits: &Limits, handler: Handler, conn_id: u64) -> Result<()> {
    let conn = tokio::time::timeout(limits.handshake, async {
        incoming.accept().map_err(quic_err)?.await.map_err(quic_err)
    })
    .await
    .map_err(|_| NetError::Timeout(limits.handshake.as_secs()))??;
    let peer = Peer {
        addr: conn.remote_address(),
        client: peer_cert(conn.peer_identity()).map(|c| fingerprint(&c)),
        transport: Transport::Quic,
        conn_id,
    };
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => return Ok(()),
            Err(e) => return Err(quic_err(e)),
        };
        let stream = Stream::new(Handle::current(), Box::pin(recv), Box::pin(send), limits.idle);
        let (handler, peer) = (handler.clone(), peer.clone());
        tokio::task::spawn_blocking(move || handler(stream, peer));
    }
}
