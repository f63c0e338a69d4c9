//! The emulator on real traffic: namespaces, TUN devices, delay and rate as
//! TCP and UDP see them, clean-up on SIGTERM. Needs root; skips otherwise.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const B_ADDR: &str = "10.99.0.2";

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let why = if unsafe { libc::geteuid() } != 0 {
        "tern-wan needs root (network namespaces and TUN devices)"
    } else if !Path::new("/dev/net/tun").exists() {
        "no /dev/net/tun on this machine"
    } else {
        return true;
    };
    // Under CI (`.ci/run` runs as root) these tests must run.
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run this test: {why}"
    );
    eprintln!("skipped: {why}");
    false
}

/// Runs `f` on a thread inside the namespace.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    let path = Path::new("/run/netns").join(ns);
    thread::spawn(move || {
        let file = File::open(&path).expect("namespace file");
        // SAFETY: setns on a namespace descriptor we hold, for this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

struct Wan {
    child: Child,
    name: String,
}

impl Wan {
    /// Starts tern-wan and waits for its ready line.
    fn start(name: &str, args: &[&str]) -> Wan {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern-wan"))
            .args(["--name", name])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tern-wan");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        BufReader::new(out).read_line(&mut line).expect("read ready line");
        assert!(line.contains("ready"), "tern-wan did not come up: {line:?}");
        Wan {
            child,
            name: name.to_string(),
        }
    }

    fn ns(&self, side: char) -> String {
        format!("{}-{side}", self.name)
    }

    /// SIGTERM, then the exit status and the error output.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let status = self.child.wait().expect("wait");
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            e.read_to_string(&mut err).ok();
        }
        (status, err)
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for side in ['a', 'b'] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(side)]).output();
        }
    }
}

#[test]
fn tcp_and_udp_cross_the_link_with_its_delay_and_rate_and_it_cleans_up() {
    if !can_run() {
        return;
    }
    let name = format!("twl{}", std::process::id());
    let wan = Wan::start(&name, &["--delay", "20ms", "--rate", "40mbit"]);

    // TCP: the connect takes a round trip (2 × 20 ms); 2 MB at 40 Mbit/s
    // takes at least 0.4 s.
    let (tx, rx) = mpsc::channel();
    let server = in_ns(&wan.ns('b'), move || {
        let l = TcpListener::bind((B_ADDR, 7000)).expect("bind");
        let u = UdpSocket::bind((B_ADDR, 7001)).expect("bind udp");
        tx.send(()).expect("ready");
        let mut buf = [0u8; 64];
        let (n, from) = u.recv_from(&mut buf).expect("udp recv");
        u.send_to(&buf[..n], from).expect("udp echo");
        let (mut s, _) = l.accept().expect("accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).expect("read");
        got
    });
    rx.recv().expect("server up");
    let client = in_ns(&wan.ns('a'), || {
        let b: SocketAddr = format!("{B_ADDR}:7001").parse().expect("addr");
        let u = UdpSocket::bind("0.0.0.0:0").expect("udp");
        u.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let t = Instant::now();
        u.send_to(b"ping", b).expect("udp send");
        let mut buf = [0u8; 64];
        let n = u.recv(&mut buf).expect("udp echo back");
        let udp_rtt = t.elapsed();
        assert_eq!(&buf[..n], b"ping");

        let t = Instant::now();
        let mut s = TcpStream::connect((B_ADDR, 7000)).expect("connect");
        let connect = t.elapsed();
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let t = Instant::now();
        s.write_all(&data).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut end = [0u8; 1];
        let _ = s.read(&mut end);
        (udp_rtt, connect, t.elapsed(), data)
    });
    let (udp_rtt, connect, transfer, sent) = client.join().expect("client");
    let got = server.join().expect("server");
    assert!(got == sent, "TCP data damaged on a clean link");
    assert!(
        udp_rtt >= Duration::from_millis(40),
        "UDP round trip {udp_rtt:?} under 2 × 20 ms"
    );
    assert!(
        connect >= Duration::from_millis(40),
        "TCP connect {connect:?} under 2 × 20 ms"
    );
    assert!(
        transfer >= Duration::from_millis(400),
        "2 MB in {transfer:?}: faster than 40 Mbit/s"
    );

    // A second emulator may not take the same names.
    let clash = Command::new(env!("CARGO_BIN_EXE_tern-wan"))
        .args(["--name", &name])
        .output()
        .expect("run");
    assert_eq!(clash.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&clash.stderr).contains("exists"));

    let (status, err) = wan.stop();
    assert!(status.success(), "tern-wan failed: {err}");
    assert!(err.contains("a→b") && err.contains("packets"), "no statistics: {err}");
    for side in ['a', 'b'] {
        assert!(
            !Path::new("/run/netns").join(format!("{name}-{side}")).exists(),
            "namespace {name}-{side} left behind"
        );
    }
}

#[test]
fn loss_on_the_link_drops_packets_at_its_rate() {
    if !can_run() {
        return;
    }
    let name = format!("twm{}", std::process::id());
    let wan = Wan::start(&name, &["--loss", "30%/0%"]);
    let (tx, rx) = mpsc::channel();
    let server = in_ns(&wan.ns('b'), move || {
        let u = UdpSocket::bind((B_ADDR, 7002)).expect("bind");
        // Room for the whole burst: only the link may drop packets.
        let size: libc::c_int = 8 << 20;
        // SAFETY: setsockopt with a pointer to a c_int of the stated size.
        let r = unsafe {
            libc::setsockopt(
                u.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        u.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
        tx.send(()).expect("ready");
        let mut n = 0u32;
        let mut buf = [0u8; 64];
        // Counts until the end marker (sent on a loss-free retry loop).
        loop {
            match u.recv_from(&mut buf) {
                Ok((1, from)) if buf[0] == b'E' => {
                    u.send_to(b"A", from).expect("ack");
                    break;
                }
                Ok(_) => n += 1,
                Err(_) => continue,
            }
        }
        n
    });
    rx.recv().expect("server up");
    in_ns(&wan.ns('a'), || {
        let u = UdpSocket::bind("0.0.0.0:0").expect("udp");
        let b: SocketAddr = format!("{B_ADDR}:7002").parse().expect("addr");
        // The device queue (10,000 packets) and the receiver's buffer hold
        // the whole burst; a full send buffer blocks rather than drops.
        for i in 0..2000u32 {
            u.send_to(&i.to_be_bytes(), b).expect("send");
        }
        u.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let mut buf = [0u8; 4];
        loop {
            u.send_to(b"E", b).expect("end");
            if u.recv(&mut buf).is_ok() {
                break;
            }
        }
    })
    .join()
    .expect("client");
    let got = server.join().expect("server");
    // 2000 packets at 30 % loss: mean 1400, sd ≈ 20.5.
    assert!((1300..=1500).contains(&got), "{got} of 2000 arrived through 30 % loss");
    let (status, err) = wan.stop();
    assert!(status.success(), "{err}");
}
