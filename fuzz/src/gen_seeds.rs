//! Writes seed inputs for the fuzz targets: well-formed exchanges the
//! fuzzer can mutate from, instead of having to discover the framing and
//! the handshake by itself. Run from the repository root:
//! `cargo run --manifest-path fuzz/Cargo.toml --bin gen_seeds`.

use std::path::Path;

use tern_proto::{data_header, encode_control, Auth, Hello, Msg, WireMeta, WireSpec, WriteChunk};

fn frames(msgs: &[Msg]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        encode_control(0, m, &mut out).expect("encode");
    }
    out
}

fn save(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join(name), bytes).expect("write seed");
}

fn main() {
    let root = Path::new("fuzz/seeds");
    let hello = Msg::Hello(Hello::ours("seed"));
    let auth = |write| {
        Msg::Auth(Auth {
            module: "data".into(),
            token: Some("t".into()),
            write,
        })
    };
    let spec = WireSpec {
        size: 5,
        chunk_size: 1024,
        resumable: true,
        durable: false,
        source_meta: WireMeta::default(),
        source_changed: (0, 0),
    };
    let mut write = frames(&[
        hello.clone(),
        auth(true),
        Msg::Create {
            handle: 1,
            path: b"new".to_vec(),
            spec,
        },
        Msg::Write(WriteChunk {
            handle: 1,
            index: 0,
            offset: 0,
            len: 5,
            holes: Vec::new(),
            cv: *blake3::hash(b"hello").as_bytes(),
        }),
    ]);
    write.extend_from_slice(&data_header(5, true));
    write.extend_from_slice(b"hello");
    write.extend(frames(&[Msg::Publish { handle: 1, writes: 1 }]));
    // sub/f as the fuzz target's module holds it (5 bytes, mtime fixed).
    let entry = tern_fuzz::file_entry(b"f", 5, tern_fuzz::FIXTURE_MTIME);
    let read = frames(&[
        hello.clone(),
        auth(false),
        Msg::OpenRead {
            handle: 1,
            path: b"sub/f".to_vec(),
            expect: entry,
        },
        Msg::Read {
            handle: 1,
            offset: 0,
            len: 5,
        },
        Msg::Read {
            handle: 1,
            offset: 1024,
            len: 3,
        },
        Msg::Ranges {
            handle: 1,
            offset: 0,
            len: 5,
        },
        Msg::CloseRead { handle: 1 },
    ]);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("read", read),
        (
            "stat",
            frames(&[
                hello.clone(),
                auth(false),
                Msg::Stat {
                    path: b"sub/f".to_vec(),
                },
            ]),
        ),
        (
            "readdir",
            frames(&[hello.clone(), auth(false), Msg::ReadDir { path: b"sub".to_vec() }]),
        ),
        (
            "mkdir",
            frames(&[hello.clone(), auth(true), Msg::MakeDir { path: b"d".to_vec() }]),
        ),
        (
            "join",
            frames(&[
                hello.clone(),
                Msg::Join {
                    session: 1,
                    secret: [0; 32],
                },
            ]),
        ),
        ("write", write),
        ("modules", frames(&[hello.clone(), Msg::ListModules { proof: None }])),
        (
            "backup",
            frames(&[
                hello.clone(),
                auth(true),
                Msg::Backup {
                    dir: Some(b"old".to_vec()),
                    base: b"sub".to_vec(),
                    suffix: b"~".to_vec(),
                },
                Msg::Remove {
                    path: b"sub/f".to_vec(),
                },
            ]),
        ),
    ];
    for (name, bytes) in &seeds {
        save(&root.join("handshake"), name, bytes);
        // The decoder's first byte picks the read size.
        let mut d = vec![7u8];
        d.extend_from_slice(bytes);
        save(&root.join("decoder"), name, &d);
    }
    let config = br#"listen = ["127.0.0.1:7373"]
pull_from = ["a.example:7373=b3:abababababababababababababababababababababababababababababababab", "b.example"]
[modules.data]
path = "/nonexistent-base"
access = "read-write"
[[tokens]]
token = "t"
modules = ["data"]
access = "read"
[[clients]]
fingerprint = "b3:0000000000000000000000000000000000000000000000000000000000000000"
modules = ["*"]
[limits]
idle_timeout_secs = 5
"#;
    save(&root.join("config"), "full", config);
    save(
        &root.join("filter"),
        "rules",
        b"*.o\n/target/\ndir/***\n**/x?[a-c]\0src/a.o\0target/\0dir/sub/f\0",
    );
    println!("seeds written to {}", root.display());
}
