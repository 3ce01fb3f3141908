//! Who holds a port. When `--listen` finds its address in use, the error
//! names the processes holding the socket (from `/proc/net/*` and
//! `/proc/*/fd`) and says whether they look like the orphaned child of an
//! earlier `baton run` (one whose supervisor was killed with SIGKILL), and
//! what to do about it.

use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};

use baton::ListenerKind;

/// A process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    pid: u32,
    command: String,
    ppid: Option<u32>,
    /// `BATON_GENERATION` of a child started by `baton run` (not of a
    /// Baton server generation, which has `BATON_PARENT_PID`).
    run_generation: Option<String>,
    /// Whether its parent is a `baton run`.
    parent_is_run: bool,
}

impl Holder {
    fn orphaned_run_child(&self) -> bool {
        self.run_generation.is_some() && !self.parent_is_run
    }
}

/// A sentence for an "address already in use" error on `address`: who
/// holds it and what to do.
pub(crate) fn describe(kind: ListenerKind, address: &str) -> String {
    let addrs: Vec<SocketAddr> = match address.to_socket_addrs() {
        Ok(a) => a.collect(),
        Err(_) => return String::new(),
    };
    let holders = holders(kind, &addrs);
    if holders.is_empty() {
        return "no process visible here holds it (another user's or another network namespace's, or a socket closing)".to_owned();
    }
    let mut out = String::new();
    for (i, h) in holders.iter().enumerate() {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(&format!("held by pid {} ({})", h.pid, h.command));
        if let Some(ppid) = h.ppid {
            out.push_str(&format!(", parent pid {ppid}"));
        }
    }
    let orphans: Vec<String> = holders
        .iter()
        .filter(|h| h.orphaned_run_child())
        .map(|h| h.pid.to_string())
        .collect();
    if orphans.is_empty() {
        out.push_str("; stop it or choose another address");
    } else {
        let generation = holders
            .iter()
            .find_map(|h| h.run_generation.clone())
            .unwrap_or_default();
        out.push_str(&format!(
            "; this looks like an orphaned child of an earlier `baton run` (generation {generation}, its supervisor is gone): stop it (kill {}) and start again",
            orphans.join(" ")
        ));
    }
    out
}

fn holders(kind: ListenerKind, addrs: &[SocketAddr]) -> Vec<Holder> {
    let tables: &[&str] = match kind {
        ListenerKind::Tcp => &["/proc/net/tcp", "/proc/net/tcp6"],
        ListenerKind::Udp => &["/proc/net/udp", "/proc/net/udp6"],
        _ => return Vec::new(),
    };
    let ports: BTreeSet<u16> = addrs.iter().map(SocketAddr::port).collect();
    let mut inodes = BTreeSet::new();
    for table in tables {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(bound_inodes(&text, &ports, kind == ListenerKind::Tcp));
    }
    let mut out = Vec::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || !holds_any(pid, &inodes) {
            continue;
        }
        out.push(holder(pid));
    }
    out
}

/// Inodes of the sockets in a `/proc/net/{tcp,udp}[6]` table bound to one
/// of `ports` (listening, for TCP).
fn bound_inodes(table: &str, ports: &BTreeSet<u16>, tcp: bool) -> Vec<u64> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let port = f[1]
            .rsplit(':')
            .next()
            .and_then(|p| u16::from_str_radix(p, 16).ok());
        // 0A = LISTEN; a UDP socket is bound whatever its state.
        if port.is_some_and(|p| ports.contains(&p)) && (!tcp || f[3] == "0A") {
            if let Ok(ino) = f[9].parse() {
                out.push(ino);
            }
        }
    }
    out
}

fn holds_any(pid: u32, inodes: &BTreeSet<u64>) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|t| {
            t.to_string_lossy()
                .strip_prefix("socket:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|ino| inodes.contains(&ino))
        })
    })
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn holder(pid: u32) -> Holder {
    let args = cmdline(pid);
    let command = if args.is_empty() {
        "?".to_owned()
    } else {
        args.join(" ")
    };
    let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|p| p.parse().ok());
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let var = |name: &str| {
        env.split(|c| *c == 0).find_map(|kv| {
            kv.strip_prefix(name.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        })
    };
    let run_generation = match (
        var(baton::env::BATON_GENERATION),
        var(baton::env::BATON_PARENT_PID),
    ) {
        (Some(g), None) => Some(g),
        _ => None,
    };
    let parent_is_run = ppid.is_some_and(|p| {
        let a = cmdline(p);
        a.len() > 1 && a[0].ends_with("baton") && a[1] == "run"
    });
    Holder {
        pid,
        command,
        ppid,
        run_generation,
        parent_is_run,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listening_sockets_on_the_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 100 0 0 10 0\n";
        let ports = BTreeSet::from([8080]);
        assert_eq!(bound_inodes(table, &ports, true), vec![4242]);
        assert_eq!(
            bound_inodes(table, &BTreeSet::from([8081]), true),
            Vec::<u64>::new()
        );
    }
}
