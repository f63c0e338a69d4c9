//! A framed, blocking view of one transport stream.
//!
//! The engine and the request handlers are plain blocking code on their own
//! threads; each drives its stream through the transport's async runtime
//! with `Handle::block_on`. Control messages are buffered and go out with
//! the next flush (every receive flushes first); data is written straight
//! from the caller's buffer.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_proto::{data_header, decode_control, encode_control, FrameHeader, FrameKind, Msg, HEADER_LEN};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Handle;

use crate::compress::{Compression, Squeeze, Squeezed};
use crate::error::{NetError, Result};
use crate::path::TcpConn;

/// Largest frame payload either side sends or accepts.
pub const MAX_PAYLOAD: u32 = (1 << 20) + 4096;
/// Largest control message accepted (a directory listing is sent in parts).
const MAX_CONTROL: usize = 1 << 20;
const READ_BUF: usize = 256 << 10;
/// Largest control message, and read buffer, of a stream whose peer has
/// not authenticated yet: a Hello, an Auth or a Join is a few hundred
/// bytes, so an unauthenticated peer costs the daemon a few KiB per stream.
pub const HANDSHAKE_CONTROL: usize = 4 << 10;

/// The receiving half of a transport stream.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
/// The sending half of a transport stream.
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// A blocking, framed stream.
pub struct Stream {
    rt: Handle,
    rd: Reader,
    wr: Writer,
    /// Allocated on the first read, `rbuf_len` long.
    rbuf: Vec<u8>,
    rbuf_len: usize,
    rpos: usize,
    rlen: usize,
    wbuf: Vec<u8>,
    timeout: Duration,
    /// No wait goes past this, whatever `timeout` says (the handshake's
    /// one deadline).
    deadline: Option<Instant>,
    max_control: usize,
    /// Set when the stream can no longer be trusted to be in step.
    broken: bool,
    /// The TCP connection under a TCP stream, sampled before it closes.
    tcp: Option<Arc<TcpConn>>,
    /// The TLS session's exporter value (see `proof::EXPORTER_LABEL`).
    exporter: Option<[u8; 32]>,
    /// Compresses what is sent, once both sides agreed to it; while there
    /// is one, containers are accepted from the peer too, and counted
    /// where it counts its own.
    squeeze: Option<Squeeze>,
    /// The frames of the last container received, from `ipos` on.
    inflated: Vec<u8>,
    ipos: usize,
    /// The frame being read came out of `inflated`.
    in_container: bool,
    /// The features both sides agreed on, once they have.
    agreed: u64,
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(t) = &self.tcp {
            t.closing();
        }
    }
}

impl Stream {
    /// Wraps the two halves of a stream; every wait is bounded by `timeout`.
    pub fn new(rt: Handle, rd: Reader, wr: Writer, timeout: Duration) -> Stream {
        Stream {
            rt,
            rd,
            wr,
            rbuf: Vec::new(),
            rbuf_len: READ_BUF,
            rpos: 0,
            rlen: 0,
            wbuf: Vec::new(),
            timeout,
            deadline: None,
            max_control: MAX_CONTROL,
            broken: false,
            tcp: None,
            exporter: None,
            squeeze: None,
            inflated: Vec::new(),
            ipos: 0,
            in_container: false,
            agreed: 0,
        }
    }

    /// Records the features both sides agreed on (from the Hellos), and
    /// compresses as they agreed: containers are accepted from the peer if
    /// it may send them, and sent when they pay. `counts` adds up what
    /// crossed compressed.
    pub fn agree(&mut self, agreed: u64, counts: Arc<Squeezed>) {
        self.agreed = agreed;
        self.squeeze = Squeeze::new(Compression::agreed(agreed), counts);
    }

    /// Whether both sides agreed on feature `bit`.
    pub fn has(&self, bit: u64) -> bool {
        self.agreed & bit != 0
    }

    /// Records the exporter value of the TLS session under the stream.
    pub fn with_exporter(mut self, exporter: Option<[u8; 32]>) -> Stream {
        self.exporter = exporter;
        self
    }

    /// The exporter value of the TLS session under the stream, which a
    /// login proof is bound to.
    pub fn exporter(&self) -> Option<[u8; 32]> {
        self.exporter
    }

    /// The round trip its TCP connection measured so far, if it is one and
    /// has.
    pub fn tcp_rtt(&self) -> Option<Duration> {
        self.tcp.as_ref().map(|t| t.sample().rtt).filter(|r| !r.is_zero())
    }

    /// Ties the stream to its TCP connection's counters.
    pub fn with_tcp(mut self, conn: Arc<TcpConn>) -> Stream {
        self.tcp = Some(conn);
        self
    }

    /// Changes the bound on every wait.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    /// Until [`Stream::authenticated`]: every wait ends by `deadline`,
    /// control messages are at most [`HANDSHAKE_CONTROL`] bytes and the
    /// read buffer is that small too.
    pub fn handshaking(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
        self.max_control = HANDSHAKE_CONTROL;
        if self.rbuf.is_empty() {
            self.rbuf_len = HANDSHAKE_CONTROL;
        }
    }

    /// Reads, on the runtime and without a thread of its own, until the
    /// first `frames` control messages are buffered whole (a client sends
    /// its Hello and its Auth, Login or Join together), the peer ends the
    /// stream, or what arrives is not a handshake message: so a peer that
    /// connects and stalls holds no blocking thread. Anything amiss is left
    /// for [`Stream::recv`] to report; the caller bounds the wait.
    pub async fn buffer_handshake(&mut self, frames: usize) -> Result<()> {
        let cap = frames * (HEADER_LEN + HANDSHAKE_CONTROL);
        self.rbuf = vec![0u8; cap];
        (self.rpos, self.rlen) = (0, 0);
        let (mut at, mut whole) = (0, 0);
        loop {
            while whole < frames && self.rlen - at >= HEADER_LEN {
                let mut hb = [0u8; HEADER_LEN];
                hb.copy_from_slice(&self.rbuf[at..at + HEADER_LEN]);
                let Ok(h) = FrameHeader::decode(&hb, MAX_PAYLOAD) else {
                    return Ok(());
                };
                if h.kind != FrameKind::Control || h.len as usize > HANDSHAKE_CONTROL {
                    return Ok(());
                }
                let end = at + HEADER_LEN + h.len as usize;
                if self.rlen < end {
                    break;
                }
                (at, whole) = (end, whole + 1);
            }
            if whole == frames || self.rlen == cap {
                return Ok(());
            }
            let n = self.rd.read(&mut self.rbuf[self.rlen..]).await?;
            if n == 0 {
                return Ok(());
            }
            self.rlen += n;
        }
    }

    /// Lifts the limits of [`Stream::handshaking`]. Bytes already buffered
    /// stay where they are.
    pub fn authenticated(&mut self) {
        self.deadline = None;
        self.max_control = MAX_CONTROL;
        self.rbuf_len = READ_BUF;
    }

    /// The bound on the next wait.
    fn limit(&self) -> Duration {
        match self.deadline {
            Some(d) => self.timeout.min(d.saturating_duration_since(Instant::now())),
            None => self.timeout,
        }
    }

    /// True after an error left the stream out of step.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn run<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// Queues a control message.
    pub fn send(&mut self, msg: &Msg) -> Result<()> {
        self.run(|s| {
            encode_control(0, msg, &mut s.wbuf)?;
            if s.wbuf.len() >= 256 << 10 {
                s.flush_inner()?;
            }
            Ok(())
        })
    }

    /// Sends `data` as data frames, the last one flagged.
    pub fn send_data(&mut self, data: &[u8]) -> Result<()> {
        self.run(|s| {
            let mut parts = data.chunks(MAX_PAYLOAD as usize).peekable();
            if parts.peek().is_none() {
                s.wbuf.extend_from_slice(&data_header(0, true));
            }
            while let Some(p) = parts.next() {
                let header = data_header(p.len() as u32, parts.peek().is_none());
                if p.len() <= 16 << 10 {
                    s.wbuf.extend_from_slice(&header);
                    s.wbuf.extend_from_slice(p);
                    // A batch of small files is many small frames: sent, and
                    // compressed, a few hundred KiB at a time.
                    if s.wbuf.len() >= 256 << 10 {
                        s.flush_inner()?;
                    }
                } else if let Some(level) = s.squeeze.as_mut().and_then(|z| z.level(HEADER_LEN + p.len())) {
                    // The frame goes in a container of its own.
                    s.flush_inner()?;
                    let mut frame = Vec::with_capacity(HEADER_LEN + p.len());
                    frame.extend_from_slice(&header);
                    frame.extend_from_slice(p);
                    s.write_packed(Some(level), &frame)?;
                } else {
                    // What is queued may go in a container, which holds
                    // whole frames only: this header goes after it, with
                    // its payload.
                    s.flush_inner()?;
                    s.write_all(&header)?;
                    s.write_all(p)?;
                }
            }
            Ok(())
        })
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<()> {
        self.run(|s| s.flush_inner())
    }

    fn flush_inner(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            let buf = std::mem::take(&mut self.wbuf);
            let r = self.write_frames(&buf);
            self.wbuf = buf;
            self.wbuf.clear();
            r?;
        }
        let t = self.limit();
        let wr = &mut self.wr;
        bounded(&self.rt, t, wr.flush())
    }

    /// Writes whole frames, in a container when compressing pays.
    fn write_frames(&mut self, frames: &[u8]) -> Result<()> {
        let level = self.squeeze.as_mut().and_then(|z| z.level(frames.len()));
        self.write_packed(level, frames)
    }

    /// Writes whole frames, in a container compressed at `level` if that
    /// makes them smaller.
    fn write_packed(&mut self, level: Option<i32>, frames: &[u8]) -> Result<()> {
        let packed = match (level, self.squeeze.as_mut()) {
            (Some(l), Some(z)) => z.compress_at(l, frames),
            _ => None,
        };
        match packed {
            Some(packed) => {
                let mut out = Vec::with_capacity(HEADER_LEN + packed.len());
                out.extend_from_slice(&container_header(packed.len() as u32));
                out.extend_from_slice(packed);
                self.write_all(&out)
            }
            None => self.write_all(frames),
        }
    }

    fn write_all(&mut self, data: &[u8]) -> Result<()> {
        let t = self.limit();
        let started = Instant::now();
        let wr = &mut self.wr;
        bounded(&self.rt, t, wr.write_all(data))?;
        if let Some(z) = self.squeeze.as_mut() {
            z.wrote(data.len(), started.elapsed());
        }
        Ok(())
    }

    /// Closes the sending side (the peer reads end of stream).
    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        let t = self.limit();
        let wr = &mut self.wr;
        bounded(&self.rt, t, wr.shutdown())
    }

    /// Fills `out` exactly, from the buffer then the stream. `Ok(false)` at
    /// a clean end of stream before the first byte.
    fn read_exact(&mut self, out: &mut [u8]) -> Result<bool> {
        let mut done = 0;
        while done < out.len() {
            if self.rpos < self.rlen {
                let n = (self.rlen - self.rpos).min(out.len() - done);
                out[done..done + n].copy_from_slice(&self.rbuf[self.rpos..self.rpos + n]);
                self.rpos += n;
                done += n;
                continue;
            }
            let t = self.limit();
            let want = out.len() - done;
            if self.rbuf.len() != self.rbuf_len {
                // Nothing is buffered here (rpos == rlen): safe to resize.
                self.rbuf = vec![0u8; self.rbuf_len];
                (self.rpos, self.rlen) = (0, 0);
            }
            let n = if want >= self.rbuf.len() {
                // Large reads go straight to the caller's buffer.
                let rd = &mut self.rd;
                bounded(&self.rt, t, rd.read(&mut out[done..]))?
            } else {
                let (rd, buf) = (&mut self.rd, &mut self.rbuf);
                let n = bounded(&self.rt, t, rd.read(buf))?;
                self.rpos = 0;
                self.rlen = n;
                n
            };
            if n == 0 {
                if done == 0 {
                    return Ok(false);
                }
                return Err(tern_proto::ProtoError::Truncated(done).into());
            }
            if want >= self.rbuf.len() {
                done += n;
            }
        }
        Ok(true)
    }

    /// The next frame's header, from the last container received while it
    /// lasts, else from the stream (inflating the containers that come).
    fn header(&mut self) -> Result<Option<FrameHeader>> {
        let bad = |m: &str| NetError::Proto(tern_proto::ProtoError::Malformed(m.into()));
        loop {
            let mut h = [0u8; HEADER_LEN];
            self.in_container = self.ipos < self.inflated.len();
            if self.in_container {
                self.take_inflated(&mut h)?;
                let h = FrameHeader::decode(&h, MAX_PAYLOAD)?;
                if h.kind == FrameKind::Zstd {
                    return Err(bad("a compressed frame inside another"));
                }
                return Ok(Some(h));
            }
            if !self.read_exact(&mut h)? {
                return Ok(None);
            }
            let h = FrameHeader::decode(&h, MAX_PAYLOAD)?;
            if h.kind != FrameKind::Zstd {
                return Ok(Some(h));
            }
            let Some(z) = &self.squeeze else {
                return Err(bad("a compressed frame on a stream that did not agree to them"));
            };
            let counts = z.counts.clone();
            let mut packed = vec![0u8; h.len as usize];
            if !self.read_exact(&mut packed)? && h.len > 0 {
                return Err(NetError::Closed);
            }
            crate::compress::inflate(&packed, &mut self.inflated).map_err(|e| bad(&e))?;
            self.ipos = 0;
            counts.add(self.inflated.len(), HEADER_LEN + packed.len());
        }
    }

    /// Fills `out` from the last container received: the payload of a frame
    /// that came in one must be in it whole.
    fn take_inflated(&mut self, out: &mut [u8]) -> Result<()> {
        let end = self.ipos + out.len();
        let Some(b) = self.inflated.get(self.ipos..end) else {
            return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                "a frame cut short at the end of a compressed frame".into(),
            )));
        };
        out.copy_from_slice(b);
        self.ipos = end;
        if self.ipos == self.inflated.len() {
            // Keep the buffer for the next container, but not a large one.
            self.inflated.clear();
            self.ipos = 0;
            if self.inflated.capacity() > 4 << 20 {
                self.inflated = Vec::new();
            }
        }
        Ok(())
    }

    /// Fills `out` with the payload of the frame whose header was read
    /// last; `Ok(false)` as [`Stream::read_exact`].
    fn payload(&mut self, out: &mut [u8]) -> Result<bool> {
        if self.in_container {
            self.take_inflated(out)?;
            return Ok(true);
        }
        self.read_exact(out)
    }

    /// Receives the next control message, flushing what is queued first.
    /// `Ok(None)` when the peer closed the stream cleanly between messages.
    pub fn recv_opt(&mut self) -> Result<Option<Msg>> {
        self.run(|s| {
            s.flush_inner()?;
            let Some(h) = s.header()? else { return Ok(None) };
            if h.kind != FrameKind::Control {
                return Err(NetError::Proto(tern_proto::ProtoError::Malformed(
                    "data frame where a message was expected".into(),
                )));
            }
            if h.len as usize > s.max_control {
                return Err(tern_proto::ProtoError::TooLarge {
                    len: h.len,
                    max: s.max_control as u32,
                }
                .into());
            }
            let mut payload = vec![0u8; h.len as usize];
            if !s.payload(&mut payload)? && h.len > 0 {
                return Err(tern_proto::ProtoError::Truncated(0).into());
            }
            Ok(Some(decode_control(&payload)?))
        })
    }

    /// Receives the next control message; an `Error` message from the peer
    /// becomes [`NetError::Remote`], end of stream [`NetError::Closed`].
    pub fn recv(&mut self) -> Result<Msg> {
        match self.recv_opt()? {
            Some(Msg::Error(e)) => Err(NetError::Remote(e)),
            Some(m) => Ok(m),
            None => {
                self.broken = true;
                Err(NetError::Closed)
            }
        }
    }

    /// Receives exactly `out.len()` bytes of data frames, the last one
    /// flagged.
    pub fn recv_data(&mut self, out: &mut [u8]) -> Result<()> {
        self.run(|s| {
            s.flush_inner()?;
            let mut done = 0;
            loop {
                let Some(h) = s.header()? else {
                    return Err(NetError::Closed);
                };
                let bad = |m: &str| NetError::Proto(tern_proto::ProtoError::Malformed(m.into()));
                if h.kind != FrameKind::Data {
                    return Err(bad("message where data was expected"));
                }
                let n = h.len as usize;
                if n > out.len() - done {
                    return Err(bad("more data than announced"));
                }
                // Nothing sends them; a peer that did could make this loop
                // spin on an inflated container of headers.
                if n == 0 && h.flags & tern_proto::FLAG_LAST == 0 {
                    return Err(bad("an empty data frame that is not the last"));
                }
                if !s.payload(&mut out[done..done + n])? && n > 0 {
                    return Err(NetError::Closed);
                }
                done += n;
                if h.flags & tern_proto::FLAG_LAST != 0 {
                    if done != out.len() {
                        return Err(bad("less data than announced"));
                    }
                    return Ok(());
                }
            }
        })
    }
}

/// The header of a container of `len` compressed bytes.
fn container_header(len: u32) -> [u8; HEADER_LEN] {
    FrameHeader {
        len,
        kind: FrameKind::Zstd,
        flags: 0,
        channel: 0,
    }
    .encode()
}

/// Runs `f` on the runtime, bounded by `t`.
fn bounded<T>(rt: &Handle, t: Duration, f: impl std::future::Future<Output = std::io::Result<T>>) -> Result<T> {
    // The timer must be made inside the runtime: hence the async block.
    match rt.block_on(async move { tokio::time::timeout(t, f).await }) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) if closed_by_peer(&e) => Err(NetError::Closed),
        Ok(Err(e)) => Err(NetError::Io(e)),
        Err(_) => Err(NetError::Timeout(t.as_secs())),
    }
}

/// A QUIC connection the peer closed normally (code 0, what a client sends
/// when it is done): the end of the stream, not a failure.
fn closed_by_peer(e: &std::io::Error) -> bool {
    use quinn::{ConnectionError, ReadError, WriteError};
    let normal = |c: &ConnectionError| matches!(c, ConnectionError::ApplicationClosed(a) if a.error_code == quinn::VarInt::from_u32(0));
    match e.get_ref() {
        Some(inner) => match (inner.downcast_ref::<ReadError>(), inner.downcast_ref::<WriteError>()) {
            (Some(ReadError::ConnectionLost(c)), _) | (_, Some(WriteError::ConnectionLost(c))) => normal(c),
            _ => false,
        },
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(rt: &tokio::runtime::Runtime) -> (Stream, Stream) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let _guard = rt.enter();
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let t = Duration::from_secs(20);
        (
            Stream::new(rt.handle().clone(), Box::pin(ar), Box::pin(aw), t),
            Stream::new(rt.handle().clone(), Box::pin(br), Box::pin(bw), t),
        )
    }

    /// Containers hold whole frames whatever mix of messages, small and
    /// large data, compressible or not, is sent, so the other side reads
    /// back exactly what was sent.
    #[test]
    fn mixed_frames_cross_compressed_and_not_intact() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (mut tx, mut rx) = pair(&rt);
        let counts = Arc::new(Squeezed::default());
        tx.agree(tern_proto::FEATURES, counts.clone());
        rx.agree(tern_proto::FEATURES, Arc::default());
        let text: Vec<u8> = b"tern copies files; ".iter().copied().cycle().take(300 << 10).collect();
        let mut noise = vec![0u8; 300 << 10];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        // A fixed mix: messages, and data of many sizes, text or noise.
        let mut x = 7u64;
        let plan: Vec<(u8, usize)> = (0..400)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 60) as u8 % 3, 1 + (x >> 20) as usize % (300 << 10))
            })
            .collect();
        fn item(text: &[u8], noise: &[u8], kind: u8, n: usize) -> Vec<u8> {
            match kind {
                0 => text[..n.min(4000)].to_vec(),
                1 => text[..n].to_vec(),
                _ => noise[..n].to_vec(),
            }
        }
        let (sent, t2, n2) = (plan.clone(), text.clone(), noise.clone());
        let sender = std::thread::spawn(move || {
            for (kind, n) in sent {
                let b = item(&t2, &n2, kind, n);
                match kind {
                    0 => tx.send(&Msg::Stat { path: b }).expect("send"),
                    _ => tx.send_data(&b).expect("data"),
                }
            }
            tx.flush().expect("flush");
            tx
        });
        for (k, (kind, n)) in plan.into_iter().enumerate() {
            let want = item(&text, &noise, kind, n);
            match kind {
                0 => match rx.recv().expect("message") {
                    Msg::Stat { path } => assert!(path == want, "message {k}"),
                    m => panic!("{m:?}"),
                },
                _ => {
                    let mut got = vec![0u8; want.len()];
                    rx.recv_data(&mut got).expect("data");
                    assert!(got == want, "data {k}");
                }
            }
        }
        let _tx = sender.join().expect("sender");
        assert!(
            counts.raw.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "nothing was compressed"
        );
    }
}
