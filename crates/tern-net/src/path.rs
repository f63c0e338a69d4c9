//! What the network did during a run: the transport's own view of the path
//! (round-trip time, loss, bytes on the wire), for the transfer summary and
//! `tern bench`; and the TCP socket settings tern picks.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The network side of a run, as the client saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PathReport {
    /// "quic" or "tcp".
    pub transport: String,
    /// Streams opened: QUIC streams on one connection, or TCP connections.
    pub streams: u64,
    /// Smoothed round-trip time, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Congestion control in use.
    pub congestion: String,
    /// Packets (QUIC) or segments (TCP) sent.
    pub packets_sent: u64,
    /// Packets the transport declared lost (QUIC) or segments it sent again
    /// (TCP).
    pub packets_lost: u64,
    /// Bytes sent on the wire: UDP payloads for QUIC, TCP payload bytes
    /// (retransmissions included) for TCP. Encryption and framing included.
    pub wire_bytes_sent: u64,
    /// Bytes received on the wire, counted the same way.
    pub wire_bytes_received: u64,
    /// Requests sent to the daemon: each that waits for a reply, each
    /// queued change, each chunk written.
    #[serde(default)]
    pub requests: u64,
    /// Times a reply was waited for with no other request in flight: the
    /// round trips the run could not overlap with anything.
    #[serde(default)]
    pub waits: u64,
    /// Bytes of frames that crossed in zstd containers, either way, as they
    /// were before compression (data and messages alike).
    #[serde(default)]
    pub bytes_compressed: u64,
    /// What those containers took on the wire, before encryption.
    #[serde(default)]
    pub bytes_compressed_wire: u64,
}

impl PathReport {
    /// Share of packets lost or sent again, 0..=1.
    pub fn loss_ratio(&self) -> f64 {
        if self.packets_sent == 0 {
            0.0
        } else {
            self.packets_lost as f64 / self.packets_sent as f64
        }
    }
}

/// The congestion control tern asks for on its TCP connections: BBR keeps a
/// long path full through random loss, where CUBIC (Linux's default) backs
/// off at every lost segment. Measured with bench/wan.sh: one tern push over
/// a 50 ms, 1 %-loss link moved 16 Mbit/s with CUBIC.
const TCP_CONGESTION: &[u8] = b"bbr";

/// Sets BBR on a TCP socket where the kernel has it (else the system's
/// default stays) and returns the name in effect.
pub fn tune_tcp(fd: RawFd) -> String {
    // SAFETY: setsockopt reads TCP_CONGESTION.len() bytes from the slice.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            TCP_CONGESTION.as_ptr().cast(),
            TCP_CONGESTION.len() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "BBR not available for TCP; keeping the system's congestion control"
        );
    }
    congestion_of(fd).unwrap_or_default()
}

fn congestion_of(fd: RawFd) -> Option<String> {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `name`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    let used = &name[..(len as usize).min(name.len())];
    let end = used.iter().position(|b| *b == 0).unwrap_or(used.len());
    Some(String::from_utf8_lossy(&used[..end]).into_owned())
}

/// The kernel's `struct tcp_info` (include/uapi/linux/tcp.h) up to
/// `tcpi_bytes_retrans`; the libc crate's copy stops before the byte
/// counters. Older kernels fill less and leave the rest zero.
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    app_limited: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
    segs_out: u32,
    segs_in: u32,
    notsent_bytes: u32,
    min_rtt: u32,
    data_segs_in: u32,
    data_segs_out: u32,
    delivery_rate: u64,
    busy_time: u64,
    rwnd_limited: u64,
    sndbuf_limited: u64,
    delivered: u32,
    delivered_ce: u32,
    bytes_sent: u64,
    bytes_retrans: u64,
}

/// One TCP connection's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TcpSample {
    /// Smoothed RTT.
    pub rtt: Duration,
    /// Segments sent.
    pub segs_out: u64,
    /// Segments sent again.
    pub retrans: u64,
    /// Payload bytes sent, retransmissions included.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
}

/// Reads a TCP socket's counters.
pub fn tcp_sample(fd: RawFd) -> Option<TcpSample> {
    let mut info = TcpInfo::default();
    let mut len = std::mem::size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a plain
    // struct of integers.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut TcpInfo).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    Some(TcpSample {
        rtt: Duration::from_micros(u64::from(info.rtt)),
        segs_out: u64::from(info.segs_out),
        retrans: u64::from(info.total_retrans),
        bytes_sent: info.bytes_sent,
        bytes_received: info.bytes_received,
    })
}

/// A TCP connection's counters, readable while it is open and kept after
/// it closes. The stream that owns the socket calls [`TcpConn::closing`]
/// before it closes the descriptor.
pub struct TcpConn {
    state: Mutex<(RawFd, Option<TcpSample>)>,
    congestion: String,
}

impl TcpConn {
    /// Tracks the socket `fd` (owned elsewhere), after asking for BBR on it
    /// ([`tune_tcp`]).
    pub fn new(fd: RawFd) -> Arc<TcpConn> {
        Arc::new(TcpConn {
            congestion: tune_tcp(fd),
            state: Mutex::new((fd, None)),
        })
    }

    /// The congestion control the connection got.
    pub fn congestion(&self) -> &str {
        &self.congestion
    }

    /// Takes the final sample; the descriptor is not touched afterwards.
    pub fn closing(&self) {
        if let Ok(mut s) = self.state.lock() {
            if s.1.is_none() {
                s.1 = Some(tcp_sample(s.0).unwrap_or_default());
            }
        }
    }

    /// The counters now (or at close).
    pub fn sample(&self) -> TcpSample {
        match self.state.lock() {
            Ok(s) => s.1.or_else(|| tcp_sample(s.0)).unwrap_or_default(),
            Err(_) => TcpSample::default(),
        }
    }
}

/// Sums the connections of a TCP session into a report.
pub fn tcp_report(conns: &[Arc<TcpConn>]) -> PathReport {
    let mut r = PathReport {
        transport: "tcp".into(),
        streams: conns.len() as u64,
        congestion: conns.first().map(|c| c.congestion().to_string()).unwrap_or_default(),
        ..Default::default()
    };
    let mut rtt_sum = Duration::ZERO;
    let mut rtt_n = 0u32;
    for c in conns {
        let s = c.sample();
        r.packets_sent += s.segs_out;
        r.packets_lost += s.retrans;
        r.wire_bytes_sent += s.bytes_sent;
        r.wire_bytes_received += s.bytes_received;
        if !s.rtt.is_zero() {
            rtt_sum += s.rtt;
            rtt_n += 1;
        }
    }
    if rtt_n > 0 {
        r.rtt_ms = Some((rtt_sum / rtt_n).as_secs_f64() * 1e3);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn tcp_counters_follow_a_real_connection_and_survive_its_close() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut got = Vec::new();
            s.read_to_end(&mut got).expect("read");
            got.len()
        });
        let mut c = std::net::TcpStream::connect(addr).expect("connect");
        let conn = TcpConn::new(c.as_raw_fd());
        assert!(!conn.congestion().is_empty(), "no congestion control reported");
        c.write_all(&vec![7u8; 3 << 20]).expect("write");
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        // Once the peer has read it all, all of it has been sent.
        assert_eq!(t.join().expect("join"), 3 << 20);
        conn.closing();
        drop(c);
        let s = conn.sample();
        assert!(s.bytes_sent >= 3 << 20, "{s:?}");
        assert!(s.segs_out > 0);
        let r = tcp_report(&[conn]);
        assert_eq!(r.streams, 1);
        assert_eq!(r.wire_bytes_sent, s.bytes_sent);
        assert!(r.rtt_ms.is_some());
    }
}
