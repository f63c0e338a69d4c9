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
use crate::path::{tcp_report, PathReport, TcpConn};
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
    /// The QUIC connection's exporter value.
    quic_exporter: Option<[u8; 32]>,
}

/// The exporter value of a QUIC connection.
fn quic_exporter(conn: &quinn::Connection) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, crate::proof::EXPORTER_LABEL, &[])
        .ok()
        .map(|()| out)
}

/// The exporter value of a TCP connection's TLS session.
fn tls_exporter<D>(c: &rustls::ConnectionCommon<D>) -> Option<[u8; 32]> {
    c.export_keying_material([0u8; 32], crate::proof::EXPORTER_LABEL, None)
        .ok()
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
                    quic_exporter: None,
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
                let exporter = quic_exporter(&conn.1);
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
                    quic_exporter: exporter,
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
                Ok(
                    Stream::new(self.rt.clone(), Box::pin(recv), Box::pin(send), self.timeout)
                        .with_exporter(self.quic_exporter),
                )
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
    let exporter = tls_exporter(tls.get_ref().1);
    let (r, w) = tokio::io::split(tls);
    let stream = Stream::new(rt.clone(), Box::pin(r), Box::pin(w), timeout)
        .with_tcp(conn.clone())
        .with_exporter(exporter);
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
    /// The connection's admission: see [`Gate`].
    pub gate: Arc<Gate>,
}

/// How a connection gets in. Until one of its streams authenticates it
/// holds a slot among the handshakes in progress (a small pool, with a
/// share per address) and must authenticate by one deadline, counted from
/// the moment it was accepted: TLS, Hello and Auth together. Only then
/// does it take a slot among the daemon's connections, so peers that never
/// authenticate cannot keep real clients out.
#[derive(Debug)]
pub struct Gate {
    deadline: std::time::Instant,
    conns: Arc<tokio::sync::Semaphore>,
    max_conns: usize,
    state: Mutex<GateState>,
    admitted: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct GateState {
    handshake: Option<HandshakeSlot>,
    conn: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// The daemon is serving as many connections as it allows (the number).
#[derive(Debug, Clone, Copy)]
pub struct Full(pub usize);

impl Gate {
    /// A gate outside any listener's pools, for a stream served without
    /// one (a test harness, a fuzzer): it admits its connection once.
    pub fn standalone(deadline: std::time::Instant) -> Arc<Gate> {
        Arc::new(Gate {
            deadline,
            conns: Arc::new(tokio::sync::Semaphore::new(1)),
            max_conns: 1,
            state: Mutex::default(),
            admitted: tokio::sync::Notify::new(),
        })
    }

    /// When the connection must have authenticated.
    pub fn deadline(&self) -> std::time::Instant {
        self.deadline
    }

    /// True once a stream of the connection authenticated.
    pub fn is_admitted(&self) -> bool {
        self.state.lock().map(|s| s.conn.is_some()).unwrap_or(false)
    }

    /// Called when a stream of the connection has authenticated: moves the
    /// connection from the handshakes to the connections, if one is free.
    pub fn admit(&self) -> std::result::Result<(), Full> {
        let mut st = self.state.lock().map_err(|_| Full(self.max_conns))?;
        if st.conn.is_none() {
            let permit = self
                .conns
                .clone()
                .try_acquire_owned()
                .map_err(|_| Full(self.max_conns))?;
            st.conn = Some(permit);
            st.handshake = None;
            self.admitted.notify_one();
        }
        Ok(())
    }
}

/// Handshakes in progress per address key (see [`addr_key`]).
type PerAddr = Arc<Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// The key an address is counted under: itself; an IPv4-mapped IPv6
/// address as IPv4; other IPv6 addresses by their /64, one host's usual
/// allocation, which it can rotate through at will.
pub fn addr_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
        v4 => v4,
    }
}

/// A slot among the handshakes in progress, given back when dropped.
#[derive(Debug)]
struct HandshakeSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    per_addr: PerAddr,
    key: std::net::IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.per_addr.lock() {
            if let Some(n) = m.get_mut(&self.key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&self.key);
                }
            }
        }
    }
}

/// The admission state of a listener.
struct Admission {
    conns: Arc<tokio::sync::Semaphore>,
    handshakes: Arc<tokio::sync::Semaphore>,
    per_addr: PerAddr,
    limits: Limits,
    /// Refusals are logged a few times a second at most, whoever causes them.
    refusals: crate::log::Limited,
}

impl Admission {
    fn new(limits: &Limits) -> Admission {
        Admission {
            conns: Arc::new(tokio::sync::Semaphore::new(limits.max_conns)),
            handshakes: Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes)),
            per_addr: PerAddr::default(),
            limits: limits.clone(),
            refusals: crate::log::Limited::per_second(5),
        }
    }

    /// True when a quarter or more of the handshake pool is in use: then
    /// QUIC clients must prove their address (a Retry) before they get a
    /// slot, so spoofed Initials cost the daemon nothing.
    fn busy(&self) -> bool {
        let used = self.limits.max_handshakes - self.handshakes.available_permits();
        used * 4 >= self.limits.max_handshakes
    }

    /// A gate for a connection from `addr`, or None (and a log line, rate
    /// limited) when the pool or the address's share is full.
    fn enter(&self, addr: SocketAddr) -> Option<Arc<Gate>> {
        let key = addr_key(addr.ip());
        let refused = |why: &str| {
            if let Some(suppressed) = self.refusals.allow() {
                tracing::warn!(peer = %addr, suppressed, "connection refused: {why}");
            }
            None
        };
        let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
            return refused("too many handshakes in progress");
        };
        {
            let Ok(mut m) = self.per_addr.lock() else { return None };
            let n = m.entry(key).or_insert(0);
            if *n >= self.limits.max_handshakes_per_addr {
                return refused("too many handshakes in progress from this address");
            }
            *n += 1;
        }
        Some(Arc::new(Gate {
            deadline: std::time::Instant::now() + self.limits.handshake,
            conns: self.conns.clone(),
            max_conns: self.limits.max_conns,
            state: Mutex::new(GateState {
                handshake: Some(HandshakeSlot {
                    _permit: permit,
                    per_addr: self.per_addr.clone(),
                    key,
                }),
                conn: None,
            }),
            admitted: tokio::sync::Notify::new(),
        }))
    }
}

/// Limits a server applies to each client.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a connection has, from its arrival, to complete TLS and
    /// authenticate a first stream.
    pub handshake: Duration,
    /// Time a stream may stay silent.
    pub idle: Duration,
    /// Concurrent streams per QUIC connection (one until it authenticates).
    pub streams_per_conn: u32,
    /// Concurrent authenticated connections (TCP and QUIC).
    pub max_conns: usize,
    /// Connections still in their handshake, at most.
    pub max_handshakes: usize,
    /// Of those, from one address (IPv6: one /64).
    pub max_handshakes_per_addr: usize,
    /// Files all clients' transfers may hold open at once; None for half
    /// the process's open-file limit (see `tern_core::open_file_budget`).
    pub open_files: Option<usize>,
    /// Bytes the buffers of all requests in progress may hold at once.
    pub request_memory: u64,
    /// Remote-to-remote transfers running at once; 0 refuses them all.
    pub max_pulls: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            streams_per_conn: 64,
            max_conns: 256,
            max_handshakes: 128,
            max_handshakes_per_addr: 32,
            open_files: None,
            request_memory: 1 << 30,
            max_pulls: 4,
        }
    }
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
    /// `keys` key QUIC's stateless resets and connection IDs; derived from
    /// the daemon's identity, they survive a restart, so clients of the
    /// previous process learn at once that their connection is gone
    /// instead of waiting for their idle timeout.
    pub async fn bind(addr: SocketAddr, tls: rustls::ServerConfig, limits: Limits, keys: QuicKeys) -> Result<Listener> {
        let tls = Arc::new(tls);
        let tcp = TcpListener::bind(addr)
            .await
            .map_err(|e| NetError::Config(format!("cannot listen on {addr} (TCP): {e}")))?;
        let local = tcp.local_addr()?;
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls.clone()).map_err(quic_err)?;
        let mut qcfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quic_transport(limits.streams_per_conn, QUIC_IDLE.min(limits.idle))?;
        // Until a stream authenticates: one stream, and a window no larger
        // than a handshake needs (see `quic_conn`).
        transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(1));
        transport.receive_window(quinn::VarInt::from_u32(PREAUTH_WINDOW));
        qcfg.transport_config(Arc::new(transport));
        let mut ecfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &keys.reset)));
        // The connection-ID check must survive the restart too: packets for
        // an unknown connection are answered with a reset only if their
        // connection ID is one this endpoint could have issued.
        let cid_key = keys.cid;
        ecfg.cid_generator(move || Box::new(TaggedCids { key: cid_key }));
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
        let admission = Admission::new(&limits);
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
                    let Some(gate) = admission.enter(peer) else { continue };
                    let (tls, limits, handler, id) = (tls.clone(), limits.clone(), handler.clone(), next_id);
                    tokio::spawn(async move {
                        if let Err(e) = tcp_conn(sock, peer, tls, &limits, handler, id, gate).await {
                            tracing::debug!(%peer, error = %e, "TCP connection failed");
                        }
                    });
                }
                c = quic.accept() => {
                    let Some(incoming) = c else { break };
                    if admission.busy() && !incoming.remote_address_validated() && incoming.may_retry() {
                        // Stateless: a spoofed source never answers the Retry.
                        let _ = incoming.retry();
                        continue;
                    }
                    let Some(gate) = admission.enter(incoming.remote_address()) else {
                        incoming.refuse();
                        continue;
                    };
                    let (limits, handler, id) = (limits.clone(), handler.clone(), next_id);
                    tokio::spawn(async move {
                        let peer = incoming.remote_address();
                        if let Err(e) = quic_conn(incoming, &limits, handler, id, gate).await {
                            tracing::debug!(%peer, error = %e, "QUIC connection ended");
                        }
                    });
                }
            }
        }
        quic.close(quinn::VarInt::from_u32(1), b"server shutting down");
    }
}

/// Connection window of a QUIC connection before it authenticates: a
/// Hello, an Auth and the requests sent with them fit many times over.
const PREAUTH_WINDOW: u32 = 64 << 10;
/// Connection window once authenticated (see [`quic_transport`]).
const QUIC_CONN_WINDOW: u32 = 64 << 20;

/// The keys of a QUIC endpoint, one per use.
#[derive(Clone)]
pub struct QuicKeys {
    /// Keys stateless-reset tokens.
    pub reset: [u8; 32],
    /// Keys the tag of connection IDs.
    pub cid: [u8; 32],
}

/// Connection IDs of 8 random bytes and an 8-byte keyed tag over them:
/// unlinkable to an observer, and checked cheaply before a reset is sent
/// for an unknown connection (a forged ID passes one time in 2^64).
struct TaggedCids {
    key: [u8; 32],
}

const CID_RANDOM: usize = 8;
const CID_LEN: usize = 16;

impl TaggedCids {
    fn tag(&self, random: &[u8]) -> [u8; CID_LEN - CID_RANDOM] {
        let h = blake3::keyed_hash(&self.key, random);
        let mut t = [0u8; CID_LEN - CID_RANDOM];
        t.copy_from_slice(&h.as_bytes()[..CID_LEN - CID_RANDOM]);
        t
    }
}

impl quinn_proto::ConnectionIdGenerator for TaggedCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let mut cid = [0u8; CID_LEN];
        if crate::server::getrandom(&mut cid[..CID_RANDOM]).is_err() {
            // The kernel's random source does not fail once the system has
            // booted; should it, fall back to a hash of the time and a
            // counter, still unpredictable without the key.
            static N: AtomicU64 = AtomicU64::new(0);
            let seed = format!(
                "{:?}{}",
                std::time::SystemTime::now(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            let h = blake3::keyed_hash(&self.key, seed.as_bytes());
            cid[..CID_RANDOM].copy_from_slice(&h.as_bytes()[CID_RANDOM..2 * CID_RANDOM]);
        }
        let tag = self.tag(&cid[..CID_RANDOM]);
        cid[CID_RANDOM..].copy_from_slice(&tag);
        quinn_proto::ConnectionId::new(&cid)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> std::result::Result<(), quinn_proto::InvalidCid> {
        let b: &[u8] = cid;
        let differs = |t: &[u8]| t.iter().zip(&b[CID_RANDOM..]).fold(0u8, |acc, (x, y)| acc | (x ^ y)) != 0;
        if b.len() == CID_LEN && !differs(&self.tag(&b[..CID_RANDOM])) {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

async fn tcp_conn(
    sock: TcpStream,
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: &Limits,
    handler: Handler,
    conn_id: u64,
    gate: Arc<Gate>,
) -> Result<()> {
    sock.set_nodelay(true)?;
    // Tunes the socket, and lets the session read its round trip.
    let tcp = TcpConn::new(sock.as_raw_fd());
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let left = gate.deadline().saturating_duration_since(std::time::Instant::now());
    let s = tokio::time::timeout(left, async {
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
        gate,
    };
    let exporter = tls_exporter(s.get_ref().1);
    let (r, w) = tokio::io::split(s);
    let mut stream = Stream::new(Handle::current(), Box::pin(r), Box::pin(w), limits.idle)
        .with_exporter(exporter)
        .with_tcp(tcp);
    let left = peer
        .gate
        .deadline()
        .saturating_duration_since(std::time::Instant::now());
    tokio::time::timeout(left, stream.buffer_handshake(HANDSHAKE_FRAMES))
        .await
        .map_err(|_| NetError::Timeout(limits.handshake.as_secs()))??;
    tokio::task::spawn_blocking(move || handler(stream, peer))
        .await
        .map_err(|e| NetError::Config(format!("handler failed: {e}")))
}

/// Messages a client sends on a new stream before it waits for an answer:
/// its Hello and its Auth, Login or Join. A stream gets a blocking thread
/// only once they are in.
const HANDSHAKE_FRAMES: usize = 2;

async fn quic_conn(
    incoming: quinn::Incoming,
    limits: &Limits,
    handler: Handler,
    conn_id: u64,
    gate: Arc<Gate>,
) -> Result<()> {
    let left = gate.deadline().saturating_duration_since(std::time::Instant::now());
    let conn = tokio::time::timeout(left, async {
        incoming.accept().map_err(quic_err)?.await.map_err(quic_err)
    })
    .await
    .map_err(|_| NetError::Timeout(limits.handshake.as_secs()))??;
    let peer = Peer {
        addr: conn.remote_address(),
        client: peer_cert(conn.peer_identity()).map(|c| fingerprint(&c)),
        transport: Transport::Quic,
        conn_id,
        gate: gate.clone(),
    };
    let exporter = quic_exporter(&conn);
    let deadline = tokio::time::Instant::from_std(gate.deadline());
    let mut open = false;
    loop {
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            _ = gate.admitted.notified(), if !open => {
                open = true;
                conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(limits.streams_per_conn));
                conn.set_receive_window(quinn::VarInt::from_u32(QUIC_CONN_WINDOW));
                continue;
            }
            _ = tokio::time::sleep_until(deadline), if !open => {
                if gate.is_admitted() {
                    // Admitted just now; the notification is still pending.
                    continue;
                }
                // The daemon's keep-alives would hold it open forever.
                conn.close(quinn::VarInt::from_u32(2), b"not authenticated in time");
                return Err(NetError::Timeout(limits.handshake.as_secs()));
            }
        };
        let (send, recv) = match accepted {
            Ok(s) => s,
            Err(quinn::ConnectionError::ApplicationClosed(_) | quinn::ConnectionError::LocallyClosed) => return Ok(()),
            Err(e) => return Err(quic_err(e)),
        };
        let mut stream =
            Stream::new(Handle::current(), Box::pin(recv), Box::pin(send), limits.idle).with_exporter(exporter);
        let (handler, peer) = (handler.clone(), peer.clone());
        let until = match gate.is_admitted() {
            true => std::time::Instant::now() + limits.handshake,
            false => gate.deadline(),
        };
        tokio::spawn(async move {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match tokio::time::timeout(left, stream.buffer_handshake(HANDSHAKE_FRAMES)).await {
                Ok(Ok(())) => {
                    tokio::task::spawn_blocking(move || handler(stream, peer));
                }
                Ok(Err(e)) => tracing::debug!(peer = %peer.addr, error = %e, "stream ended before its handshake"),
                Err(_) => tracing::debug!(peer = %peer.addr, "stream sent no handshake in time"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn_proto::{ConnectionId, ConnectionIdGenerator};
    use std::net::IpAddr;

    #[test]
    fn ipv6_peers_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| addr_key(s.parse::<IpAddr>().expect("address"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff:1:2:3"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2::"));
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
    }

    #[test]
    fn connection_ids_are_random_and_tagged_with_their_own_key() {
        let mut ours = TaggedCids { key: [1; 32] };
        let other = TaggedCids { key: [2; 32] };
        let ids: Vec<ConnectionId> = (0..1000).map(|_| ours.generate_cid()).collect();
        let randoms: std::collections::HashSet<Vec<u8>> = ids.iter().map(|c| c[..CID_RANDOM].to_vec()).collect();
        assert_eq!(randoms.len(), ids.len(), "random parts repeat");
        for id in &ids {
            assert_eq!(id.len(), CID_LEN);
            assert!(ours.validate(id).is_ok());
            assert!(other.validate(id).is_err(), "another key's tag accepted");
        }
        let mut forged = ids[0].to_vec();
        forged[CID_LEN - 1] ^= 1;
        assert!(ours.validate(&ConnectionId::new(&forged)).is_err());
        assert!(ours.validate(&ConnectionId::new(&ids[0][..CID_LEN - 1])).is_err());
    }
}
