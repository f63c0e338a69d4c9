//! The Linux side: network namespaces, TUN devices, waiting on descriptors.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// Runs `ip ARGS`, failing with its error output.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2 is needed)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// True when a network namespace of that name exists.
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// A named network namespace, deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with its loopback up.
    pub fn create(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` with the calling thread inside the namespace, then moves the
    /// thread back. Descriptors opened in `f` stay bound to the namespace.
    pub fn enter<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let home = File::open("/proc/thread-self/ns/net").context("opening own network namespace")?;
        let target = File::open(Path::new("/run/netns").join(&self.name))
            .with_context(|| format!("opening namespace {}", self.name))?;
        setns(&target).with_context(|| format!("entering namespace {}", self.name))?;
        let result = f();
        setns(&home).context("returning to the original network namespace")?;
        result
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("tern-wan: could not remove namespace {}: {e:#}", self.name);
        }
    }
}

fn setns(f: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a descriptor we own.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A layer-3 TUN device (no packet-info header), non-blocking.
pub struct Tun {
    fd: OwnedFd,
}

impl Tun {
    /// Creates the device `name` in the calling thread's namespace.
    pub fn create(name: &str) -> Result<Tun> {
        let cname = CString::new(name).context("device name has a NUL byte")?;
        let bytes = cname.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            bail!("device name {name:?} is longer than {} bytes", libc::IFNAMSIZ - 1);
        }
        let path = CString::new("/dev/net/tun").context("path")?;
        // SAFETY: valid C string, flags only.
        let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error()).context("opening /dev/net/tun");
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which IfReq lays out.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("creating TUN device {name}"));
        }
        Ok(Tun { fd })
    }

    /// Reads one packet; `Ok(None)` when none is waiting.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: writes at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        }
    }

    /// Hands one packet to the kernel on this device.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: reads packet.len() bytes from packet.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (None: no
/// limit). Returns which are readable.
pub fn wait_readable<const N: usize>(fds: [RawFd; N], timeout: Option<Duration>) -> io::Result<[bool; N]> {
    let mut polls = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tsp = ts.as_ref().map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `polls` holds N pollfd structs; `tsp` is null or points to a timespec.
    let n = unsafe { libc::ppoll(polls.as_mut_ptr(), N as libc::nfds_t, tsp, std::ptr::null()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([false; N]);
        }
        return Err(e);
    }
    Ok(polls.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0))
}

/// Asks the kernel to wake this thread's timers within 1 µs instead of the
/// default 50 µs slack: delays and pacing are timed by ppoll.
pub fn tight_timers() {
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
}

/// Raises the calling thread's scheduling priority (nice -10), so the link
/// is not starved by the programs that use it on a busy machine.
pub fn raise_priority() {
    // SAFETY: gettid and setpriority take and return plain integers.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, -10);
    }
}
