//! Adaptive zstd compression of what a stream sends.
//!
//! A stream whose peer agreed to it ([`tern_proto::FEATURE_ZSTD`]) may send
//! a run of whole frames as one zstd-compressed container frame
//! ([`tern_proto::FrameKind::Zstd`]); the receiver inflates it (into at most
//! [`tern_proto::MAX_INFLATED`] bytes) and reads the frames inside as if they
//! had come plainly. Chunk hashes are of the plain bytes, so compression
//! changes nothing the receiver verifies.
//!
//! Whether to compress is decided per container from two rates measured on
//! the stream: how fast the link takes bytes (the time writes spend
//! blocked, which on a fast link is close to none) and how fast zstd runs
//! here, with the ratio of recent containers. Compression pays when the
//! time it takes is less than the wire time it saves; the level is the
//! highest that still keeps up with the link. Data that does not compress
//! is sent plainly, and tried again less and less often.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_proto::{FEATURE_ZSTD, FEATURE_ZSTD_ALWAYS, MAX_INFLATED};

/// When a stream compresses what it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Never; the peer is asked not to either.
    Never,
    /// When the measured link is slow enough for it to pay.
    #[default]
    Auto,
    /// Whenever the data compresses, whatever the link.
    Always,
}

impl Compression {
    /// The feature bits a side with this choice offers in its Hello.
    pub fn features(self) -> u64 {
        match self {
            Compression::Never => 0,
            Compression::Auto => FEATURE_ZSTD,
            Compression::Always => FEATURE_ZSTD | FEATURE_ZSTD_ALWAYS,
        }
    }

    /// `features` (a Hello's) with the compression bits this choice offers
    /// in place of whatever they had.
    pub fn offer(self, features: u64) -> u64 {
        features & !(FEATURE_ZSTD | FEATURE_ZSTD_ALWAYS) | self.features()
    }

    /// The choice as [`tern_proto::PullExtra`] carries it.
    pub fn to_wire(self) -> u8 {
        match self {
            Compression::Never => 0,
            Compression::Auto => 1,
            Compression::Always => 2,
        }
    }

    /// The choice from [`Compression::to_wire`]'s byte.
    pub fn from_wire(b: u8) -> Option<Compression> {
        [Compression::Never, Compression::Auto, Compression::Always]
            .get(usize::from(b))
            .copied()
    }

    /// What a stream does given the features both sides agreed on.
    pub fn agreed(features: u64) -> Compression {
        match (features & FEATURE_ZSTD != 0, features & FEATURE_ZSTD_ALWAYS != 0) {
            (false, _) => Compression::Never,
            (true, false) => Compression::Auto,
            (true, true) => Compression::Always,
        }
    }
}

/// Fills `buf` with the data `tern bench` moves: incompressible, so that the
/// link is measured whatever either side's compression says.
pub(crate) fn bench_filler(buf: &mut [u8]) {
    blake3::Hasher::new().update(b"tern bench").finalize_xof().fill(buf);
}

/// Bytes that crossed compressed, in either direction, on the streams that
/// share this count (a client's run, a daemon's session), and how fast
/// those streams' link drains, measured by all of them.
#[derive(Debug, Default)]
pub struct Squeezed {
    /// Their size before compression.
    pub raw: AtomicU64,
    /// Their size on the wire (container headers included).
    pub wire: AtomicU64,
    link: Mutex<Rate>,
    /// The path is long (its round trip is a WAN's): until the link is
    /// measured, `Auto` compresses at level 1 rather than not at all.
    far: std::sync::atomic::AtomicBool,
}

impl Squeezed {
    /// Says whether the path these streams share is long.
    pub fn set_far(&self, far: bool) {
        self.far.store(far, Ordering::Relaxed);
    }

    pub(crate) fn add(&self, raw: usize, wire: usize) {
        self.raw.fetch_add(raw as u64, Ordering::Relaxed);
        self.wire.fetch_add(wire as u64, Ordering::Relaxed);
    }
}

/// Levels tried, and their speed relative to level 1 (zstd 1.5 on one core
/// here, 1 MiB blocks of logs: level 3 runs at 0.6 of level 1's speed,
/// level 6 at 0.2, level 9 at 0.11, where it squeezes 5 % more than 6).
const LEVELS: [(i32, f64); 4] = [(1, 1.0), (3, 0.6), (6, 0.2), (9, 0.11)];
/// zstd's level-1 speed assumed before one is measured, bytes per second.
const ASSUMED_SPEED: f64 = 300e6;
/// Containers smaller than this are not worth compressing.
const MIN_SIZE: usize = 512;
/// Writes shorter than this say little about the link.
const MIN_MEASURED: usize = 16 << 10;
/// A write that took at least this long waited for the link.
const BLOCKED: Duration = Duration::from_micros(200);
/// Writes measured (by any of the streams sharing the count) before the
/// link's rate is trusted.
const WARMUP: u32 = 2;
/// Under `Auto` on a link too fast to compress for, one container in this
/// many is compressed anyway, to keep the ratio and the speed measured.
const PROBE_EVERY: u32 = 32;

/// A rate from decayed sums of bytes and seconds.
#[derive(Debug, Default, Clone, Copy)]
struct Rate {
    bytes: f64,
    secs: f64,
    samples: u32,
}

impl Rate {
    fn add(&mut self, bytes: usize, t: Duration) {
        const DECAY: f64 = 0.875;
        self.bytes = self.bytes * DECAY + bytes as f64;
        self.secs = self.secs * DECAY + t.as_secs_f64();
        self.samples = self.samples.saturating_add(1);
    }

    /// Bytes per second; infinite when nothing took measurable time.
    fn per_sec(&self) -> f64 {
        if self.secs <= 0.0 {
            f64::INFINITY
        } else {
            self.bytes / self.secs
        }
    }
}

/// The sending side's compressor and its measurements, one per stream.
pub(crate) struct Squeeze {
    mode: Compression,
    cctx: Option<zstd::bulk::Compressor<'static>>,
    level: i32,
    out: Vec<u8>,
    /// zstd's speed, as level 1 would run.
    speed: Rate,
    /// Compressed / raw size of recent containers.
    ratio: f64,
    /// Containers to send plainly before trying again, after data that did
    /// not compress; `backoff` doubles each time it fails again.
    skip: u32,
    backoff: u32,
    since_probe: u32,
    pub(crate) counts: Arc<Squeezed>,
}

impl Squeeze {
    /// A compressor for a stream whose agreed choice is `mode` (`None` for
    /// [`Compression::Never`]).
    pub(crate) fn new(mode: Compression, counts: Arc<Squeezed>) -> Option<Squeeze> {
        (mode != Compression::Never).then(|| Squeeze {
            mode,
            cctx: None,
            level: 0,
            out: Vec::new(),
            speed: Rate::default(),
            ratio: 0.5,
            skip: 0,
            backoff: 0,
            since_probe: 0,
            counts,
        })
    }

    /// Notes a write of `len` bytes to the link that took `t`. Only a write
    /// that had to wait says how fast the link drains: one the socket's
    /// buffer took at once says only that it had room.
    pub(crate) fn wrote(&mut self, len: usize, t: Duration) {
        if len >= MIN_MEASURED && t >= BLOCKED {
            if let Ok(mut l) = self.counts.link.lock() {
                l.add(len, t);
            }
        }
    }

    /// The level to compress `len` bytes of frames at now, `None` to send
    /// them plainly. Asked once per container.
    pub(crate) fn level(&mut self, len: usize) -> Option<i32> {
        if !(MIN_SIZE..=MAX_INFLATED).contains(&len) {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        let speed = match self.speed.samples {
            0 => ASSUMED_SPEED,
            _ => self.speed.per_sec(),
        };
        // Compressing and sending overlap, so a byte costs the longer of
        // 1/(speed·f) to compress and ratio/link to send (`link` is what
        // this stream's writes drain at, its share of the path). The
        // highest level that keeps up with the link sends the fewest bytes
        // in no more time; if none does, level 1 still pays where it
        // compresses faster than the link takes plain bytes. Either way
        // with half a core: the rest is the run's (reading, hashing, the
        // other streams).
        let ratio = self.ratio.clamp(0.02, 1.0);
        let link = self.counts.link.lock().map(|l| *l).unwrap_or_default();
        let keeps_up = |f: f64| speed * f / 2.0 >= link.per_sec() / ratio;
        let fits = LEVELS
            .iter()
            .rev()
            .find(|&&(_, f)| keeps_up(f))
            .map(|&(l, _)| l)
            .or_else(|| (speed / 2.0 > link.per_sec() && ratio < 0.95).then_some(1));
        match self.mode {
            Compression::Never => None,
            Compression::Always => Some(fits.unwrap_or(1)),
            Compression::Auto if link.samples < WARMUP => self.counts.far.load(Ordering::Relaxed).then_some(1),
            Compression::Auto => match fits {
                Some(l) => Some(l),
                None => {
                    self.since_probe += 1;
                    (self.since_probe >= PROBE_EVERY).then(|| {
                        self.since_probe = 0;
                        1
                    })
                }
            },
        }
    }

    /// `frames` compressed into one container's payload, when that is
    /// worth it now and makes it smaller; `None` to send them plainly.
    #[cfg(test)]
    fn compress(&mut self, frames: &[u8]) -> Option<&[u8]> {
        let level = self.level(frames.len())?;
        self.compress_at(level, frames)
    }

    /// `frames` compressed at `level` (from [`Squeeze::level`]), if that
    /// makes them smaller.
    pub(crate) fn compress_at(&mut self, level: i32, frames: &[u8]) -> Option<&[u8]> {
        if self.cctx.is_none() || self.level != level {
            self.cctx = zstd::bulk::Compressor::new(level).ok();
            self.level = level;
        }
        let cctx = self.cctx.as_mut()?;
        self.out.clear();
        self.out.reserve(zstd::zstd_safe::compress_bound(frames.len()));
        let t = Instant::now();
        let n = cctx.compress_to_buffer(frames, &mut self.out).ok()?;
        let f = LEVELS.iter().find(|l| l.0 == level).map_or(1.0, |l| l.1);
        self.speed.add((frames.len() as f64 / f) as usize, t.elapsed());
        let ratio = n as f64 / frames.len() as f64;
        self.ratio = self.ratio * 0.75 + ratio * 0.25;
        // A container is one frame: no larger than a frame may be.
        if n > crate::stream::MAX_PAYLOAD as usize {
            return None;
        }
        if ratio > 0.95 {
            self.backoff = (self.backoff * 2).clamp(4, 256);
            self.skip = self.backoff;
            return None;
        }
        self.backoff = 0;
        self.counts.add(frames.len(), n + tern_proto::HEADER_LEN);
        Some(&self.out[..n])
    }
}

/// Inflates one container's payload into `out`, which it replaces. The
/// content size must be stated in the zstd frame and be at most
/// [`MAX_INFLATED`], so a peer cannot make this side allocate more.
pub(crate) fn inflate(payload: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let size = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n <= MAX_INFLATED as u64 => n as usize,
        Ok(Some(n)) => return Err(format!("a compressed frame of {n} bytes inflated")),
        _ => return Err("a compressed frame without its size".into()),
    };
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| e.to_string())?;
    // Containers hold at most MAX_INFLATED bytes: no window beyond that.
    d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(22))
        .map_err(|e| e.to_string())?;
    out.clear();
    out.reserve(size);
    let n = d
        .decompress_to_buffer(payload, out)
        .map_err(|e| format!("a compressed frame that does not inflate: {e}"))?;
    if n != size {
        return Err("a compressed frame whose size is not what it says".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Words drawn at random from a few hundred, as logs and sources are:
    /// compressible about threefold, at zstd's usual speeds (a string
    /// repeated would compress faster than any link).
    fn text(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let w = x % 400;
            out.extend_from_slice(format!("w{w} ").as_bytes());
            if x % 11 == 0 {
                out.push(b'\n');
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn auto_compresses_only_once_the_link_is_measured_slow() {
        let counts = Arc::new(Squeezed::default());
        let mut fast = Squeeze::new(Compression::Auto, counts.clone()).expect("auto");
        let data = text(1 << 20);
        // A link that takes 1 MiB in 300 µs (3.5 GB/s) is never worth it,
        // but for the occasional probe.
        let mut compressed = 0;
        for _ in 0..64 {
            fast.wrote(1 << 20, Duration::from_micros(300));
            compressed += usize::from(fast.compress(&data).is_some());
        }
        assert!(compressed <= 64 / PROBE_EVERY as usize, "{compressed} of 64 compressed");
        // 1 MiB in 100 ms (10 MB/s), on another connection: compressed at a
        // level above 1.
        let counts = Arc::new(Squeezed::default());
        let mut slow = Squeeze::new(Compression::Auto, counts.clone()).expect("auto");
        assert!(
            slow.compress(&data).is_none(),
            "compressed before the link was measured"
        );
        for _ in 0..WARMUP {
            slow.wrote(1 << 20, Duration::from_millis(100));
        }
        let out = slow.compress(&data).expect("compressed").to_vec();
        // Before a link is measured, a long path compresses at level 1.
        let far = Arc::new(Squeezed::default());
        far.set_far(true);
        let mut early = Squeeze::new(Compression::Auto, far).expect("auto");
        assert!(
            early.compress(&data).is_some() && early.level == 1,
            "not compressed early"
        );
        assert!(slow.level > 1, "level {}", slow.level);
        let mut back = Vec::new();
        inflate(&out, &mut back).expect("inflate");
        assert_eq!(back, data);
        assert!(counts.raw.load(Ordering::Relaxed) >= 1 << 20);
    }

    #[test]
    fn the_level_is_the_highest_that_keeps_up_with_the_link() {
        // zstd at 600 MB/s (level 1) on data that shrinks to a fifth.
        let level_for = |link_bytes_per_sec: f64| {
            let counts = Arc::new(Squeezed::default());
            let mut z = Squeeze::new(Compression::Auto, counts.clone()).expect("auto");
            z.speed.add(600 << 20, Duration::from_secs(1));
            z.ratio = 0.2;
            let t = Duration::from_secs_f64((1 << 20) as f64 / link_bytes_per_sec);
            for _ in 0..WARMUP {
                z.wrote(1 << 20, t);
            }
            z.level(1 << 20)
        };
        // 40 Mbit/s takes 25 MB/s of raw bytes: level 9 (35 MB/s on half a
        // core) keeps up. 100 Mbit/s takes 62 MB/s: level 6 (63 MB/s) does.
        // At 240 Mbit/s (150 MB/s) level 6 falls behind and level 3
        // (189 MB/s) does not.
        assert_eq!(level_for(5e6), Some(9));
        assert_eq!(level_for(12.5e6), Some(6));
        assert_eq!(level_for(30e6), Some(3));
        // 2 Gbit/s: none keeps up, and level 1 (315 MB/s with half a core)
        // still beats sending plainly.
        assert_eq!(level_for(250e6), Some(1));
        // Faster than that: plainly (but for a probe).
        assert_eq!(level_for(1e9), None);
    }

    #[test]
    fn incompressible_data_goes_plainly_and_is_tried_less_often() {
        let mut z = Squeeze::new(Compression::Always, Arc::new(Squeezed::default())).expect("always");
        let mut noise = vec![0u8; 256 << 10];
        blake3::Hasher::new().finalize_xof().fill(&mut noise);
        let tried: Vec<bool> = (0..40)
            .map(|_| {
                let before = z.speed.samples;
                let sent = z.compress(&noise).is_some();
                assert!(!sent, "noise sent compressed");
                z.speed.samples > before
            })
            .collect();
        let n = tried.iter().filter(|&&t| t).count();
        assert!(n <= 5, "noise compressed {n} times of 40");
        assert!(Squeeze::new(Compression::Never, Arc::new(Squeezed::default())).is_none());
    }

    #[test]
    fn containers_that_lie_about_their_size_or_inflate_too_far_are_refused() {
        let big = zstd::bulk::compress(&vec![0u8; MAX_INFLATED + 1], 1).expect("compress");
        let mut out = Vec::new();
        let e = inflate(&big, &mut out).expect_err("too large");
        assert!(e.contains("inflated"), "{e}");
        let mut nosize = Vec::new();
        {
            let mut enc = zstd::stream::write::Encoder::new(&mut nosize, 1).expect("encoder");
            enc.include_contentsize(false).expect("param");
            std::io::Write::write_all(&mut enc, b"hello").expect("write");
            enc.finish().expect("finish");
        }
        assert!(inflate(&nosize, &mut out)
            .expect_err("no size")
            .contains("without its size"));
        let mut ok = zstd::bulk::compress(&text(4096), 1).expect("compress");
        inflate(&ok, &mut out).expect("inflate");
        assert_eq!(out, text(4096));
        let last = ok.len() - 1;
        ok[last] ^= 0xFF;
        ok.truncate(ok.len() - 2);
        assert!(inflate(&ok, &mut out).is_err(), "a cut frame inflated");
    }
}
