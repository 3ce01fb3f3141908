//! Named listeners: adopted from the previous generation (or systemd), or
//! bound anew.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use serde::Serialize;
use socket2::{Domain, SockRef, Socket, Type};

use crate::sys;

/// The kind of a named listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// A TCP listening socket.
    Tcp,
    /// A UDP socket.
    Udp,
    /// A Unix stream listening socket.
    Unix,
}

impl fmt::Display for ListenerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ListenerKind::Tcp => "tcp",
            ListenerKind::Udp => "udp",
            ListenerKind::Unix => "unix",
        })
    }
}

/// Where a listener is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// An IP address and port.
    Inet(SocketAddr),
    /// A filesystem path (Unix socket).
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Inet(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Describes an fd: its kind and bound address.
pub(crate) fn describe(fd: &OwnedFd) -> io::Result<(ListenerKind, ListenAddr)> {
    if !sys::is_socket(fd.as_fd())? {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "inherited fd is not a socket",
        ));
    }
    let sock = SockRef::from(fd);
    let ty = sock.r#type()?;
    let domain = sock.domain()?;
    let local = sock.local_addr()?;
    if domain == Domain::UNIX {
        if ty != Type::STREAM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inherited unix socket is not a stream socket",
            ));
        }
        let path = local.as_pathname().map(Path::to_path_buf).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "inherited unix socket has no filesystem path",
            )
        })?;
        return Ok((ListenerKind::Unix, ListenAddr::Unix(path)));
    }
    let addr = local.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "inherited socket is neither inet nor unix",
        )
    })?;
    if ty == Type::STREAM {
        Ok((ListenerKind::Tcp, ListenAddr::Inet(addr)))
    } else if ty == Type::DGRAM {
        Ok((ListenerKind::Udp, ListenAddr::Inet(addr)))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "inherited socket is neither stream nor datagram",
        ))
    }
}

/// An fd handed to this process and not yet claimed by the application.
#[derive(Debug)]
pub(crate) struct InheritedFd {
    pub name: String,
    pub fd: OwnedFd,
    pub kind: ListenerKind,
    pub addr: ListenAddr,
}

/// What the application asks for.
#[derive(Debug, Clone)]
pub(crate) enum Want {
    /// Any of these addresses (a resolved host name); port 0 matches any port.
    Inet(Vec<SocketAddr>),
    Unix(PathBuf),
}

impl Want {
    fn matches(&self, addr: &ListenAddr) -> bool {
        match (self, addr) {
            (Want::Inet(wants), ListenAddr::Inet(have)) => wants
                .iter()
                .any(|w| w.ip() == have.ip() && (w.port() == have.port() || w.port() == 0)),
            (Want::Unix(want), ListenAddr::Unix(have)) => want == have,
            _ => false,
        }
    }
}

/// The fds inherited at start, waiting to be claimed by name.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    fds: Vec<InheritedFd>,
}

/// systemd names fds it was given no name for "unknown"; such fds are matched
/// by address instead of by name.
const UNNAMED: &str = "unknown";

impl Inherited {
    pub fn new(fds: Vec<InheritedFd>) -> Self {
        Inherited { fds }
    }

    /// Takes the fd named `name` if it is of `kind` and matches `want`. An fd
    /// of that name whose address no longer matches is left in place (and
    /// closed when the generation becomes ready). Unnamed fds (from systemd)
    /// are matched by kind and address.
    pub fn take(&mut self, name: &str, kind: ListenerKind, want: &Want) -> Option<InheritedFd> {
        let by_name = self
            .fds
            .iter()
            .position(|f| f.name == name && f.kind == kind && want.matches(&f.addr));
        let pos = by_name.or_else(|| {
            self.fds.iter().position(|f| {
                (f.name == UNNAMED || f.name.is_empty()) && f.kind == kind && want.matches(&f.addr)
            })
        })?;
        Some(self.fds.swap_remove(pos))
    }

    /// Whatever nobody claimed; dropping it closes the fds.
    pub fn take_rest(&mut self) -> Vec<InheritedFd> {
        std::mem::take(&mut self.fds)
    }
}

pub(crate) fn bind_tcp(addrs: &[SocketAddr]) -> io::Result<Socket> {
    let mut last = None;
    for addr in addrs {
        let sock = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
        // SO_REUSEADDR only lets us bind past TIME_WAIT, as every server does.
        // Never SO_REUSEPORT: generations share one socket, not one port.
        sock.set_reuse_address(true)?;
        // Accepted sockets inherit it: no 40 ms Nagle/delayed-ACK stalls on
        // small responses, even for a child that never sets it (what
        // systemd's `NoDelay=` does).
        sock.set_tcp_nodelay(true)?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        match sock.bind(&(*addr).into()) {
            Ok(()) => {
                sock.listen(1024)?;
                sock.set_nonblocking(true)?;
                return Ok(sock);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address")))
}

pub(crate) fn bind_udp(addrs: &[SocketAddr]) -> io::Result<Socket> {
    let mut last = None;
    for addr in addrs {
        let sock = Socket::new(Domain::for_address(*addr), Type::DGRAM, None)?;
        if addr.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        match sock.bind(&(*addr).into()) {
            Ok(()) => {
                sock.set_nonblocking(true)?;
                return Ok(sock);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address")))
}

/// Binds a Unix stream socket at `path`. A stale socket file left by a
/// crashed process (nobody accepts on it) is replaced; a live one is an
/// `AddrInUse` error rather than being stolen.
pub(crate) fn bind_unix(path: &Path) -> io::Result<Socket> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running process", path.display()),
                ))
            }
            Err(_) => std::fs::remove_file(path)?,
        }
    }
    let sock = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    sock.bind(&socket2::SockAddr::unix(path)?)?;
    sock.listen(1024)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// A listener this generation holds: the application has its own fd, and
/// Baton keeps a duplicate to hand to the next generation. The duplicate is
/// closed when this generation starts draining, so the old process holds no
/// listening fd afterwards.
#[derive(Debug)]
pub(crate) struct Held {
    pub name: String,
    pub kind: ListenerKind,
    pub addr: ListenAddr,
    pub fd: OwnedFd,
}

/// A listener as reported by `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerInfo {
    /// The application's name for it.
    pub name: String,
    /// TCP, UDP or Unix.
    pub kind: ListenerKind,
    /// The bound address.
    pub address: ListenAddr,
    /// Whether it was inherited (true) or bound by this generation.
    pub inherited: bool,
}

/// A listener as written on a command line: `tcp://HOST:PORT`,
/// `udp://HOST:PORT`, `unix:/path` (or `unix:///path`), or plain
/// `HOST:PORT` for TCP.
///
/// ```
/// use baton::{ListenSpec, ListenerKind};
/// let spec: ListenSpec = "udp://127.0.0.1:5353".parse().unwrap();
/// assert_eq!(spec.kind, ListenerKind::Udp);
/// assert_eq!(spec.address, "127.0.0.1:5353");
/// assert!("ftp://x".parse::<ListenSpec>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// TCP, UDP or Unix.
    pub kind: ListenerKind,
    /// `HOST:PORT`, or the path for Unix sockets.
    pub address: String,
}

impl std::str::FromStr for ListenSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, address) = if let Some(rest) = s.strip_prefix("tcp://") {
            (ListenerKind::Tcp, rest)
        } else if let Some(rest) = s.strip_prefix("udp://") {
            (ListenerKind::Udp, rest)
        } else if let Some(rest) = s.strip_prefix("unix://") {
            (ListenerKind::Unix, rest)
        } else if let Some(rest) = s.strip_prefix("unix:") {
            (ListenerKind::Unix, rest)
        } else if s.contains("://") {
            return Err(format!(
                "{s:?}: unknown scheme (use tcp://, udp:// or unix:)"
            ));
        } else {
            (ListenerKind::Tcp, s)
        };
        if address.is_empty() {
            return Err(format!("{s:?}: empty address"));
        }
        if kind != ListenerKind::Unix && !address.contains(':') {
            return Err(format!("{s:?}: expected HOST:PORT"));
        }
        Ok(ListenSpec {
            kind,
            address: address.to_owned(),
        })
    }
}

impl fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ListenerKind::Unix => write!(f, "unix:{}", self.address),
            k => write!(f, "{k}://{}", self.address),
        }
    }
}

impl ListenSpec {
    /// Binds it, the way a Baton server binds a listener it did not inherit
    /// (`SO_REUSEADDR`, never `SO_REUSEPORT`, `TCP_NODELAY` for TCP,
    /// backlog 1024, non-blocking, close-on-exec). Resolves host names;
    /// blocks while it does.
    pub fn bind(&self) -> io::Result<OwnedFd> {
        let sock = match self.kind {
            ListenerKind::Unix => bind_unix(Path::new(&self.address))?,
            kind => {
                use std::net::ToSocketAddrs;
                let addrs: Vec<SocketAddr> = self.address.to_socket_addrs()?.collect();
                if kind == ListenerKind::Tcp {
                    bind_tcp(&addrs)?
                } else {
                    bind_udp(&addrs)?
                }
            }
        };
        Ok(sock.into())
    }

    /// The address a socket bound from this spec actually has (the port an
    /// ephemeral `:0` got, say).
    pub fn local_addr(fd: &OwnedFd) -> io::Result<ListenAddr> {
        describe(fd).map(|(_, addr)| addr)
    }
}
