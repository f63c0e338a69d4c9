//! `tern-wan`: two network namespaces joined by an emulated link.
//!
//! Packets written into the TUN device of one namespace are read by a
//! userspace forwarder, pass through the link model of their direction
//! (rate limit and queue, loss, corruption, delay and jitter, reordering,
//! duplication) and are written into the TUN device of the other. Any IP
//! traffic crosses it, so TCP and UDP tools see the same link.
//! See docs/wan-emulator.md.

mod link;
mod os;
mod spec;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

use link::{Link, LinkConfig, Stats};
use os::{Netns, Tun};

const ADDR_A: &str = "10.99.0.1";
const ADDR_B: &str = "10.99.0.2";
const DEVICE: &str = "wan0";

/// Two network namespaces, NAME-a (10.99.0.1) and NAME-b (10.99.0.2),
/// joined by an emulated link. Every link option takes one value for both
/// directions or `A/B` for a→b and b→a. Runs COMMAND (with TERN_WAN_A,
/// TERN_WAN_B, TERN_WAN_A_ADDR and TERN_WAN_B_ADDR set) and tears the link
/// down when it exits, or without a command until interrupted.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// Prefix of the namespace names (NAME-a, NAME-b).
    #[arg(long, default_value = "wan")]
    name: String,
    /// Start from a benchmark profile: lan, continent, lossy, far.
    #[arg(long)]
    profile: Option<String>,
    /// One-way delay, e.g. 25ms.
    #[arg(long)]
    delay: Option<String>,
    /// Delay varies uniformly within ± this (never reorders), e.g. 2ms.
    #[arg(long)]
    jitter: Option<String>,
    /// Random loss, e.g. 1%.
    #[arg(long)]
    loss: Option<String>,
    /// Share of packets held back so later ones overtake them, e.g. 0.5%.
    #[arg(long)]
    reorder: Option<String>,
    /// How long a reordered packet is held back (default 1ms).
    #[arg(long)]
    reorder_gap: Option<String>,
    /// Share of packets delivered twice, e.g. 0.1%.
    #[arg(long)]
    duplicate: Option<String>,
    /// Share of packets with one payload bit flipped, e.g. 0.1%.
    #[arg(long)]
    corrupt: Option<String>,
    /// Bottleneck rate, e.g. 1gbit or 200mbit (default unlimited).
    #[arg(long)]
    rate: Option<String>,
    /// Drop-tail queue at the bottleneck, e.g. 4m (default one round trip
    /// of data at the rate, at least 64k).
    #[arg(long)]
    queue: Option<String>,
    /// MTU of the link.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Seed of the link's randomness (the b→a direction uses SEED+1).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Remove namespaces of the same name left behind by a killed run.
    #[arg(long)]
    replace: bool,
    /// Program to run while the link is up (from the host namespace).
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tern-wan: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Builds each direction's link from the profile and the options.
fn configs(args: &Args) -> Result<(LinkConfig, LinkConfig)> {
    let base = match &args.profile {
        Some(p) => spec::profile(p)?,
        None => LinkConfig {
            reorder_gap: Duration::from_millis(1),
            ..Default::default()
        },
    };
    let (mut a, mut b) = (base.clone(), base);
    macro_rules! apply {
        ($opt:ident, $name:literal, $parse:expr, $field:ident) => {
            if let Some(v) = &args.$opt {
                let (x, y) = spec::pair(v, $parse).with_context(|| format!("--{} {v}", $name))?;
                a.$field = x;
                b.$field = y;
            }
        };
    }
    apply!(delay, "delay", spec::duration, delay);
    apply!(jitter, "jitter", spec::duration, jitter);
    apply!(loss, "loss", spec::percent, loss);
    apply!(reorder, "reorder", spec::percent, reorder);
    apply!(reorder_gap, "reorder-gap", spec::duration, reorder_gap);
    apply!(duplicate, "duplicate", spec::percent, duplicate);
    apply!(corrupt, "corrupt", spec::percent, corrupt);
    apply!(rate, "rate", |s| spec::rate(s).map(Some), rate_bps);
    apply!(queue, "queue", |s| spec::size(s).map(Some), queue_bytes);
    Ok((a, b))
}

fn describe(c: &LinkConfig) -> String {
    let rate = c
        .rate_bps
        .map_or("unlimited".to_string(), |r| format!("{} Mbit/s", r as f64 / 1e6));
    format!(
        "delay {:?} ±{:?}, loss {}%, reorder {}% (+{:?}), duplicate {}%, corrupt {}%, rate {rate}, queue {} KiB",
        c.delay,
        c.jitter,
        c.loss * 100.0,
        c.reorder * 100.0,
        c.reorder_gap,
        c.duplicate * 100.0,
        c.corrupt * 100.0,
        c.queue_limit() / 1024
    )
}

fn run(args: Args) -> Result<ExitCode> {
    let (cfg_ab, cfg_ba) = configs(&args)?;
    if !(576..=65_535).contains(&args.mtu) {
        bail!("--mtu {} must be between 576 and 65535", args.mtu);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) to create network namespaces and TUN devices");
    }
    let names = [format!("{}-a", args.name), format!("{}-b", args.name)];
    for n in &names {
        if os::netns_exists(n) {
            if !args.replace {
                bail!(
                    "network namespace {n} exists: another tern-wan is using that name, or one was killed \
                     (rerun with --replace, or `ip netns del {n}`)"
                );
            }
            os::ip(&["netns", "del", n])?;
        }
    }

    // Signals and the end of the command wake every thread through this pair.
    let (wake_rx, wake_tx) = UnixStream::pair().context("creating the wake-up socket")?;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let tx = wake_tx.try_clone().context("cloning the wake-up socket")?;
        signal_hook::low_level::pipe::register(sig, tx).context("installing signal handlers")?;
    }

    let ns_a = Netns::create(&names[0])?;
    let ns_b = Netns::create(&names[1])?;
    let mtu = args.mtu.to_string();
    let tun_a = setup_side(&ns_a, ADDR_A, ADDR_B, &mtu)?;
    let tun_b = setup_side(&ns_b, ADDR_B, ADDR_A, &mtu)?;

    let start = Instant::now();
    let tun_a = Arc::new(tun_a);
    let tun_b = Arc::new(tun_b);
    let mut forwarders = Vec::new();
    for (src, dst, cfg, seed) in [
        (tun_a.clone(), tun_b.clone(), cfg_ab.clone(), args.seed),
        (tun_b.clone(), tun_a.clone(), cfg_ba.clone(), args.seed.wrapping_add(1)),
    ] {
        let wake = wake_rx.try_clone().context("cloning the wake-up socket")?;
        forwarders.push(thread::spawn(move || {
            forward(&src, &dst, Link::new(cfg, seed), &wake, start)
        }));
    }

    eprintln!("tern-wan: a→b {}", describe(&cfg_ab));
    eprintln!("tern-wan: b→a {}", describe(&cfg_ba));
    println!("tern-wan ready: {} {ADDR_A} <-> {} {ADDR_B}", ns_a.name(), ns_b.name());
    std::io::stdout().flush().ok();

    let mut code = ExitCode::SUCCESS;
    if let Some((prog, rest)) = args.command.split_first() {
        let mut child = Command::new(prog)
            .args(rest)
            .env("TERN_WAN_A", ns_a.name())
            .env("TERN_WAN_B", ns_b.name())
            .env("TERN_WAN_A_ADDR", ADDR_A)
            .env("TERN_WAN_B_ADDR", ADDR_B)
            .spawn()
            .with_context(|| format!("starting {prog}"))?;
        let pid = child.id();
        let tx = wake_tx.try_clone().context("cloning the wake-up socket")?;
        let waiter = thread::spawn(move || {
            let status = child.wait();
            let _ = (&tx).write_all(b"x");
            status
        });
        os::wait_readable([wake_rx.as_raw_fd()], None).context("waiting")?;
        if !waiter.is_finished() {
            // Interrupted: stop the command before tearing the link down.
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let status = waiter
            .join()
            .map_err(|_| anyhow::anyhow!("command waiter panicked"))?
            .with_context(|| format!("waiting for {prog}"))?;
        code = ExitCode::from(status.code().map_or(1, |c| c.clamp(0, 255) as u8));
    } else {
        os::wait_readable([wake_rx.as_raw_fd()], None).context("waiting")?;
    }
    (&wake_tx).write_all(b"x").ok();
    for (dir, f) in ["a→b", "b→a"].into_iter().zip(forwarders) {
        match f.join() {
            Ok(Ok(s)) => eprintln!("tern-wan: {dir} {}", report(&s)),
            Ok(Err(e)) => eprintln!("tern-wan: {dir} forwarder failed: {e:#}"),
            Err(_) => eprintln!("tern-wan: {dir} forwarder panicked"),
        }
    }
    drop((tun_a, tun_b));
    drop((ns_a, ns_b));
    Ok(code)
}

fn report(s: &Stats) -> String {
    format!(
        "{} packets ({} bytes) in, {} out; lost {}, queue drops {}, reordered {}, duplicated {}, corrupted {}",
        s.offered, s.offered_bytes, s.delivered, s.lost, s.queue_drops, s.reordered, s.duplicated, s.corrupted
    )
}

/// Creates the side's TUN device inside its namespace and gives it an
/// address, its peer, the MTU and a long transmit queue (the forwarder, not
/// the device, is where packets should queue).
fn setup_side(ns: &Netns, local: &str, peer: &str, mtu: &str) -> Result<Tun> {
    let tun = ns.enter(|| Tun::create(DEVICE))?;
    let n = ns.name();
    os::ip(&["-n", n, "addr", "add", local, "peer", peer, "dev", DEVICE])?;
    os::ip(&["-n", n, "link", "set", DEVICE, "mtu", mtu, "txqueuelen", "10000", "up"])?;
    Ok(tun)
}

/// Moves packets from `src` through `link` into `dst` until woken.
fn forward(src: &Tun, dst: &Tun, mut link: Link, wake: &UnixStream, start: Instant) -> Result<Stats> {
    os::tight_timers();
    os::raise_priority();
    let now = || start.elapsed().as_nanos() as u64;
    let mut buf = vec![0u8; 65_536];
    let mut send_errors = 0u64;
    loop {
        let t = now();
        while let Some(p) = link.pop_due(t) {
            // The receiving stack may refuse a packet (a corrupted header):
            // that is the link's loss, not the forwarder's failure.
            if dst.send(&p).is_err() {
                send_errors += 1;
            }
        }
        let timeout = link.next_due().map(|d| Duration::from_nanos(d.saturating_sub(now())));
        let [readable, woken] =
            os::wait_readable([src.as_raw_fd(), wake.as_raw_fd()], timeout).context("waiting for packets")?;
        if woken {
            break;
        }
        if readable {
            // A bounded batch, so due packets are not held up by a flood.
            for _ in 0..64 {
                match src.recv(&mut buf).context("reading from the TUN device")? {
                    Some(n) => link.offer(now(), buf[..n].to_vec()),
                    None => break,
                }
            }
        }
    }
    if send_errors > 0 {
        eprintln!("tern-wan: {send_errors} packets refused by the receiving stack");
    }
    Ok(link.stats().clone())
}
