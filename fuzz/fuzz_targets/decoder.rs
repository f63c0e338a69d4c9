//! The frame decoder and the control-message decoder on arbitrary bytes,
//! fed in arbitrary pieces: errors are fine, panics, hangs and allocations
//! beyond the frame limit are not. A decoded message must encode again and
//! decode to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_proto::{decode_control, encode_control, Decoder, Frame};

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the input is cut into reads.
    let Some((&cut, rest)) = data.split_first() else { return };
    let step = usize::from(cut % 64) + 1;
    let mut d = Decoder::new(1 << 16);
    for piece in rest.chunks(step) {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(Frame::Control { msg, .. })) => {
                    let mut out = Vec::new();
                    encode_control(0, &msg, &mut out).expect("a decoded message encodes");
                    let again = decode_control(&out[tern_proto::HEADER_LEN..]).expect("and decodes");
                    assert_eq!(again, msg);
                }
                Ok(Some(Frame::Data { .. } | Frame::Zstd { .. })) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = d.finish();
    // The payload decoder alone, on the raw input.
    let _ = decode_control(rest);
});
