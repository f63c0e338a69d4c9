//! Frame headers and the incremental decoder.

use crate::{Msg, ProtoError};

/// Length of a frame header.
pub const HEADER_LEN: usize = 12;

/// Default payload limit: a 16 MiB chunk plus room for its metadata.
pub const DEFAULT_MAX_PAYLOAD: u32 = (16 << 20) + 4096;

/// Flag: the last frame of its channel.
pub const FLAG_LAST: u8 = 1;

/// Most bytes one [`FrameKind::Zstd`] container may inflate to.
pub const MAX_INFLATED: usize = 2 << 20;

/// What a frame's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A postcard-encoded [`Msg`].
    Control,
    /// Raw bytes.
    Data,
    /// A zstd frame that inflates to whole frames of the other kinds, at
    /// most [`MAX_INFLATED`] bytes, its size stated in its header. Sent only
    /// to a peer that offered [`crate::FEATURE_ZSTD`].
    Zstd,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length.
    pub len: u32,
    /// Payload kind.
    pub kind: FrameKind,
    /// Flag bits ([`FLAG_LAST`]).
    pub flags: u8,
    /// Channel the frame belongs to.
    pub channel: u32,
}

impl FrameHeader {
    /// The header's 12 bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.len.to_le_bytes());
        h[4] = match self.kind {
            FrameKind::Control => 0,
            FrameKind::Data => 1,
            FrameKind::Zstd => 2,
        };
        h[5] = self.flags;
        h[8..12].copy_from_slice(&self.channel.to_le_bytes());
        h
    }

    /// Parses a header, checking the length against `max_payload`.
    pub fn decode(h: &[u8; HEADER_LEN], max_payload: u32) -> Result<FrameHeader, ProtoError> {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        if len > max_payload {
            return Err(ProtoError::TooLarge { len, max: max_payload });
        }
        let kind = match h[4] {
            0 => FrameKind::Control,
            1 => FrameKind::Data,
            2 => FrameKind::Zstd,
            k => return Err(ProtoError::BadKind(k)),
        };
        if h[6] != 0 || h[7] != 0 || h[5] & !FLAG_LAST != 0 {
            return Err(ProtoError::Reserved);
        }
        Ok(FrameHeader {
            len,
            kind,
            flags: h[5],
            channel: u32::from_le_bytes([h[8], h[9], h[10], h[11]]),
        })
    }
}

/// A complete frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A control message.
    Control {
        /// Channel.
        channel: u32,
        /// The message.
        msg: Msg,
    },
    /// Bulk bytes.
    Data {
        /// Channel.
        channel: u32,
        /// Flag bits.
        flags: u8,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// A compressed container, not inflated here.
    Zstd {
        /// Channel.
        channel: u32,
        /// The zstd frame.
        bytes: Vec<u8>,
    },
}

/// Appends a control frame carrying `msg` to `out`.
pub fn encode_control(channel: u32, msg: &Msg, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let payload = postcard::to_extend(msg, std::mem::take(out)).map_err(|e| ProtoError::Malformed(e.to_string()))?;
    *out = payload;
    let len = u32::try_from(out.len() - start - HEADER_LEN).map_err(|_| ProtoError::TooLarge {
        len: u32::MAX,
        max: DEFAULT_MAX_PAYLOAD,
    })?;
    let h = FrameHeader {
        len,
        kind: FrameKind::Control,
        flags: 0,
        channel,
    };
    out[start..start + HEADER_LEN].copy_from_slice(&h.encode());
    Ok(())
}

/// Decodes the payload of a control frame.
pub fn decode_control(payload: &[u8]) -> Result<Msg, ProtoError> {
    postcard::from_bytes(payload).map_err(|e| ProtoError::Malformed(e.to_string()))
}

/// The header of a data frame of `len` bytes; `last` marks the end of the
/// data that belongs together.
pub fn data_header(len: u32, last: bool) -> [u8; HEADER_LEN] {
    FrameHeader {
        len,
        kind: FrameKind::Data,
        flags: if last { FLAG_LAST } else { 0 },
        channel: 0,
    }
    .encode()
}

/// Turns a byte stream into frames. Memory is bounded by one frame: a header
/// announcing more than the limit is an error before anything is buffered.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    pos: usize,
    max_payload: u32,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl Decoder {
    /// A decoder accepting payloads up to `max_payload` bytes.
    pub fn new(max_payload: u32) -> Decoder {
        Decoder {
            buf: Vec::new(),
            pos: 0,
            max_payload,
        }
    }

    /// Adds bytes received from the peer.
    pub fn push(&mut self, data: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        let avail = &self.buf[self.pos..];
        let Some(head) = avail.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let h = FrameHeader::decode(head, self.max_payload)?;
        let total = HEADER_LEN + h.len as usize;
        if avail.len() < total {
            self.buf.reserve(total - avail.len());
            return Ok(None);
        }
        let payload = &avail[HEADER_LEN..total];
        let frame = match h.kind {
            FrameKind::Control => {
                let msg = decode_control(payload)?;
                Frame::Control {
                    channel: h.channel,
                    msg,
                }
            }
            FrameKind::Data => Frame::Data {
                channel: h.channel,
                flags: h.flags,
                bytes: payload.to_vec(),
            },
            FrameKind::Zstd => Frame::Zstd {
                channel: h.channel,
                bytes: payload.to_vec(),
            },
        };
        self.pos += total;
        if self.pos > (1 << 20) && self.pos * 2 > self.buf.len() {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        Ok(Some(frame))
    }

    /// Call when the peer closed the stream: an error if it stopped inside a
    /// frame.
    pub fn finish(&self) -> Result<(), ProtoError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(ProtoError::Truncated(n)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorCode, ErrorMsg, Hello};

    fn frames(bytes: &[u8], step: usize) -> Result<Vec<Frame>, ProtoError> {
        let mut d = Decoder::default();
        let mut out = Vec::new();
        for piece in bytes.chunks(step.max(1)) {
            d.push(piece);
            while let Some(f) = d.next_frame()? {
                out.push(f);
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn control_and_data_roundtrip_in_any_split() {
        let mut wire = Vec::new();
        let hello = Msg::Hello(Hello::ours("test"));
        encode_control(0, &hello, &mut wire).expect("encode");
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let h = FrameHeader {
            len: data.len() as u32,
            kind: FrameKind::Data,
            flags: FLAG_LAST,
            channel: 7,
        };
        wire.extend_from_slice(&h.encode());
        wire.extend_from_slice(&data);
        let err = Msg::Error(ErrorMsg {
            code: ErrorCode::NotFound,
            message: "x".into(),
        });
        encode_control(9, &err, &mut wire).expect("encode");
        for step in [1, 3, 12, 13, 4096, wire.len()] {
            let got = frames(&wire, step).expect("decode");
            assert_eq!(got.len(), 3, "step {step}");
            assert_eq!(
                got[0],
                Frame::Control {
                    channel: 0,
                    msg: hello.clone()
                }
            );
            assert_eq!(
                got[1],
                Frame::Data {
                    channel: 7,
                    flags: FLAG_LAST,
                    bytes: data.clone()
                }
            );
            assert_eq!(
                got[2],
                Frame::Control {
                    channel: 9,
                    msg: err.clone()
                }
            );
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_buffering() {
        let h = FrameHeader {
            len: 100,
            kind: FrameKind::Data,
            flags: 0,
            channel: 1,
        };
        let mut d = Decoder::new(99);
        d.push(&h.encode());
        assert_eq!(d.next_frame(), Err(ProtoError::TooLarge { len: 100, max: 99 }));
    }

    #[test]
    fn bad_headers_and_truncation_are_errors() {
        let mut h = FrameHeader {
            len: 0,
            kind: FrameKind::Data,
            flags: 0,
            channel: 0,
        }
        .encode();
        h[4] = 9;
        assert_eq!(frames(&h, 12), Err(ProtoError::BadKind(9)));
        h[4] = 1;
        h[6] = 1;
        assert_eq!(frames(&h, 12), Err(ProtoError::Reserved));
        h[6] = 0;
        h[5] = 0x80;
        assert_eq!(frames(&h, 12), Err(ProtoError::Reserved));

        let mut wire = Vec::new();
        encode_control(1, &Msg::Hello(Hello::ours("t")), &mut wire).expect("encode");
        assert!(matches!(
            frames(&wire[..wire.len() - 1], 5),
            Err(ProtoError::Truncated(_))
        ));

        // A control frame whose payload is garbage.
        let mut bad = FrameHeader {
            len: 3,
            kind: FrameKind::Control,
            flags: 0,
            channel: 0,
        }
        .encode()
        .to_vec();
        bad.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(frames(&bad, 64), Err(ProtoError::Malformed(_))));
    }
}

#[cfg(test)]
mod robustness {
    use super::*;

    /// Deterministic xorshift bytes.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn random_and_mutated_input_never_panics_or_overallocates() {
        let mut valid = Vec::new();
        encode_control(3, &Msg::Hello(crate::Hello::ours("fuzz")), &mut valid).expect("encode");
        for seed in 0..2000u64 {
            let mut input = if seed % 2 == 0 {
                noise(seed, (seed % 300) as usize)
            } else {
                // Valid frames with a few bytes flipped.
                let mut v = valid.repeat(3);
                let n = v.len();
                for k in 0..3 {
                    let i = noise(seed * 31 + k, 8)[0] as usize * 7 % n;
                    v[i] ^= noise(seed * 17 + k, 1)[0] | 1;
                }
                v
            };
            input.truncate(4096);
            let mut d = Decoder::new(1 << 16);
            d.push(&input);
            // Each call consumes a frame or stops: at most one frame per 12 bytes.
            for _ in 0..=input.len() / HEADER_LEN {
                match d.next_frame() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            assert!(d.buf.capacity() <= (1 << 16) + HEADER_LEN + 8192, "seed {seed}");
        }
    }
}
