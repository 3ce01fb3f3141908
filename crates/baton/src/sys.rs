//! The one module that touches raw file descriptors and creates processes.
//!
//! Everything here is small and mechanical on purpose: adopting the fds a
//! previous generation (or systemd) passed us, and starting the next
//! generation with exactly the fds it must inherit. Every `unsafe` block has a
//! `SAFETY:` comment; nothing outside this module uses `unsafe`.
#![allow(unsafe_code)]

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::FdFlags;
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};

/// First fd number of the systemd socket-activation convention (`SD_LISTEN_FDS_START`).
pub(crate) const LISTEN_FDS_START: RawFd = 3;

/// `from_env` may only take ownership of inherited fd numbers once per process:
/// adopting the same number twice would close it twice.
static ADOPTED: AtomicBool = AtomicBool::new(false);

/// Claims the right to adopt inherited fds; returns false if already claimed.
pub(crate) fn claim_inherited() -> bool {
    !ADOPTED.swap(true, Ordering::SeqCst)
}

/// Takes ownership of an fd number handed to us through the environment, after
/// checking that it is open. The fd is made close-on-exec so it can never leak
/// into a child by accident (the next generation gets it again explicitly).
pub(crate) fn adopt_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: we only borrow the number for the duration of this check; the
    // fcntl below fails with EBADF if it is not open, so no owned handle is
    // created for a closed number.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed)?;
    rustix::io::fcntl_setfd(borrowed, FdFlags::CLOEXEC)?;
    // SAFETY: the fd is open (checked above) and was handed to this process
    // for it to own (LISTEN_FDS / BATON_*_FD). `claim_inherited` guarantees
    // each number is adopted at most once per process, so there is exactly one
    // owner that will close it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Checks that an adopted fd is a socket.
pub(crate) fn is_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let st = rustix::fs::fstat(fd)?;
    Ok(rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Socket)
}

/// Replaces this process's stderr with `fd` (then closes `fd`).
pub(crate) fn redirect_stderr(fd: OwnedFd) -> io::Result<()> {
    Ok(rustix::stdio::dup2_stderr(&fd)?)
}

/// Registers a pidfd with the tokio reactor; it becomes readable when the
/// process exits.
pub(crate) fn async_pidfd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` is open, and the `AsyncFd` owns it for its whole
    // life; `OwnedFd::as_raw_fd` always returns the same number.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
    };
    Ok(registered?)
}

/// A duplicate of this process's stderr (close-on-exec), if it is open.
pub(crate) fn dup_stderr() -> Option<OwnedFd> {
    let stderr = io::stderr();
    stderr.as_fd().try_clone_to_owned().ok()
}

/// `CLOCK_MONOTONIC` in microseconds, as systemd's `MONOTONIC_USEC=` wants.
pub(crate) fn monotonic_usec() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// What to start: program, full argv (argv[0] included), environment (without
/// `LISTEN_PID`, which is filled in with the child's own pid after fork), the
/// fds to place at 3, 4, ... and an optional replacement for fd 2.
pub(crate) struct SpawnSpec<'a> {
    pub program: &'a Path,
    pub args: &'a [OsString],
    pub env: Vec<(OsString, OsString)>,
    pub fds: Vec<BorrowedFd<'a>>,
    pub stderr: Option<BorrowedFd<'a>>,
    /// Set `LISTEN_PID` to the child's pid.
    pub listen_pid: bool,
}

/// A started child: its pid (also its process group id) and a pidfd to wait on.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub pid: Pid,
    pub pidfd: OwnedFd,
}

fn cstring(bytes: &[u8], what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// Starts a child process with `fork` + `execve`.
///
/// We do not use `std::process::Command` because the systemd convention needs
/// `LISTEN_PID` to be the child's own pid, which only exists after fork. All
/// allocation happens before fork; the child only runs async-signal-safe calls.
/// The child is put in its own process group so that a rollback can kill
/// everything it started. Exec failures (missing file, not executable) are
/// reported back through a close-on-exec pipe, as `std` does, so the caller
/// gets the errno synchronously.
///
/// This blocks until the child has exec'd or failed to; call it from a
/// blocking context.
pub(crate) fn spawn(spec: SpawnSpec<'_>) -> io::Result<Spawned> {
    let program = cstring(spec.program.as_os_str().as_bytes(), "program path")?;
    let argv_c: Vec<CString> = spec
        .args
        .iter()
        .map(|a| cstring(a.as_bytes(), "argument"))
        .collect::<io::Result<_>>()?;
    let mut env_c: Vec<CString> = Vec::with_capacity(spec.env.len() + 1);
    for (k, v) in &spec.env {
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env_c.push(cstring(&kv, "environment variable")?);
    }
    // "LISTEN_PID=" followed by room for the digits and a NUL; the child
    // writes its pid in place. 11 + 20 digits + NUL fits in 40 bytes.
    const PREFIX: &[u8] = b"LISTEN_PID=";
    let mut listen_pid_buf: Box<[u8; 40]> = Box::new([0u8; 40]);
    listen_pid_buf[..PREFIX.len()].copy_from_slice(PREFIX);

    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    if spec.listen_pid {
        envp.push(listen_pid_buf.as_ptr().cast());
    }
    envp.push(std::ptr::null());
    let listen_pid_ptr: *mut u8 = listen_pid_buf.as_mut_ptr();

    let sources: Vec<RawFd> = spec.fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let stderr_src: RawFd = spec.stderr.map(|fd| fd.as_raw_fd()).unwrap_or(-1);
    // Every temporary copy made in the child is numbered above every target,
    // so a dup2 onto a target can never clobber a source still to be moved.
    let high: RawFd = LISTEN_FDS_START + sources.len() as RawFd + 16;

    let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    let err_w_raw = err_w.as_raw_fd();

    // SAFETY: fork is safe to call; what matters is what the child does
    // afterwards. In the child branch below we only call async-signal-safe
    // functions (setpgid, sigprocmask, signal, fcntl, dup2, close_range via
    // syscall, getpid, execve, write, _exit) and touch memory that was fully
    // prepared before the fork (argv/envp arrays, the LISTEN_PID buffer, the
    // `sources` vector). No allocation, no locks, no Rust destructors run.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: see the fork comment above; this function never returns.
        unsafe {
            child_after_fork(
                &program,
                &argv,
                &envp,
                &sources,
                stderr_src,
                high,
                err_w_raw,
                listen_pid_ptr,
                PREFIX.len(),
            )
        }
    }

    // Parent.
    drop(err_w);
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::other("fork returned pid 0"))?;
    let mut buf = [0u8; 4];
    let mut got = 0usize;
    loop {
        match rustix::io::read(&err_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == buf.len() {
                    break;
                }
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got > 0 {
        // exec failed: the child wrote its errno and exited; reap it.
        let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
        let errno = i32::from_ne_bytes(buf);
        return Err(io::Error::from_raw_os_error(errno));
    }
    // The child has exec'd and nobody else reaps it, so the pid is still ours.
    let pidfd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())?;
    // Keep the buffers alive until after exec in the child (they are copies
    // there, but be explicit that nothing was freed before fork).
    drop((argv_c, env_c, listen_pid_buf, argv, envp));
    Ok(Spawned { pid, pidfd })
}

/// The child's side of [`spawn`]. Never returns.
///
/// # Safety
/// Must only be called in the child right after `fork`, with pointers that
/// were valid in the parent before the fork.
#[allow(clippy::too_many_arguments)]
unsafe fn child_after_fork(
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    sources: &[RawFd],
    stderr_src: RawFd,
    high: RawFd,
    err_w: RawFd,
    listen_pid: *mut u8,
    prefix_len: usize,
) -> ! {
    // SAFETY (whole function): only async-signal-safe libc calls on plain
    // integers and on memory prepared before fork; see `spawn`.
    unsafe {
        // Own process group: a rollback kills the group, taking any helper
        // processes the new generation started with it.
        libc::setpgid(0, 0);
        // Signal state as a fresh process expects it: nothing blocked, and
        // SIGPIPE back to default (the Rust runtime ignores it in the parent).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);

        // Move the error pipe out of the way of the targets.
        let err_w = libc::fcntl(err_w, libc::F_DUPFD_CLOEXEC, high);
        if err_w < 0 {
            libc::_exit(127);
        }
        // Copy each source above every target, then dup2 onto its target:
        // dup2 clears close-on-exec on the target, the copies stay cloexec.
        let mut tmp = [0 as RawFd; 256];
        if sources.len() > tmp.len() {
            *libc::__errno_location() = libc::EMFILE;
            fail(err_w);
        }
        for (i, &src) in sources.iter().enumerate() {
            let t = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, high + 1);
            if t < 0 {
                fail(err_w);
            }
            tmp[i] = t;
        }
        let stderr_tmp = if stderr_src >= 0 {
            let t = libc::fcntl(stderr_src, libc::F_DUPFD_CLOEXEC, high + 1);
            if t < 0 {
                fail(err_w);
            }
            t
        } else {
            -1
        };
        for (i, _) in sources.iter().enumerate() {
            if libc::dup2(tmp[i], LISTEN_FDS_START + i as RawFd) < 0 {
                fail(err_w);
            }
        }
        if stderr_tmp >= 0 && libc::dup2(stderr_tmp, 2) < 0 {
            fail(err_w);
        }
        // Belt and braces: everything above the passed fds is close-on-exec,
        // whatever the rest of the process opened without O_CLOEXEC.
        libc::syscall(
            libc::SYS_close_range,
            (LISTEN_FDS_START + sources.len() as RawFd) as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );

        // LISTEN_PID=<our pid>, written without allocating.
        let mut pid = libc::getpid() as u64;
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (pid % 10) as u8;
            n += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        for i in 0..n {
            *listen_pid.add(prefix_len + i) = digits[n - 1 - i];
        }
        *listen_pid.add(prefix_len + n) = 0;

        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        fail(err_w)
    }
}

/// Reports errno through the exec-error pipe and exits (child side only).
///
/// # Safety
/// Only for the child between fork and exec; async-signal-safe.
unsafe fn fail(err_w: RawFd) -> ! {
    // SAFETY: errno location and write/_exit are async-signal-safe.
    unsafe {
        let errno = *libc::__errno_location();
        let bytes = errno.to_ne_bytes();
        libc::write(err_w, bytes.as_ptr().cast(), bytes.len());
        libc::_exit(127)
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitStatus {
    Code(i32),
    Signal(i32),
}

pub(crate) fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        _ => "signal",
    }
}

/// Reaps the child behind `pidfd` if it has exited (non-blocking).
pub(crate) fn try_reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    let status = rustix::process::waitid(
        WaitId::PidFd(pidfd),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    )?;
    Ok(status.and_then(|s| {
        if let Some(code) = s.exit_status() {
            Some(ExitStatus::Code(code))
        } else {
            s.terminating_signal().map(ExitStatus::Signal)
        }
    }))
}

/// Whether the child behind `pidfd` has exited, without reaping it.
pub(crate) fn has_exited(pidfd: BorrowedFd<'_>) -> bool {
    match rustix::process::waitid(
        WaitId::PidFd(pidfd),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
    ) {
        Ok(status) => status.is_some(),
        // Already reaped.
        Err(_) => true,
    }
}

/// Reaps `pid` if it is an exited child of ours (non-blocking); true if it
/// was reaped or is not our child (any more).
pub(crate) fn reap_pid(pid: u32) -> bool {
    let Some(p) = Pid::from_raw(pid as i32) else {
        return true;
    };
    match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
        Ok(Some(_)) => true,
        Ok(None) => false,
        Err(_) => true,
    }
}

/// SIGKILLs one process by pid.
pub(crate) fn kill_pid(pid: u32) {
    if let Some(p) = Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(p, Signal::KILL);
    }
}

/// Whether this process is a child subreaper (`PR_GET_CHILD_SUBREAPER`).
pub(crate) fn is_child_subreaper() -> io::Result<bool> {
    Ok(rustix::process::child_subreaper()?.is_some())
}

/// Makes this process a child subreaper, or not (`PR_SET_CHILD_SUBREAPER`):
/// orphaned descendants are reparented to it instead of to init.
pub(crate) fn set_child_subreaper(on: bool) -> io::Result<()> {
    let me = on.then(rustix::process::getpid);
    Ok(rustix::process::set_child_subreaper(me)?)
}

/// SIGKILLs the child's whole process group, and the child itself in case it
/// left the group.
pub(crate) fn kill_group(pid: Pid, pidfd: BorrowedFd<'_>) {
    let _ = rustix::process::kill_process_group(pid, Signal::KILL);
    let _ = rustix::process::pidfd_send_signal(pidfd, Signal::KILL);
}

/// Whether the process behind `pidfd` (a child or not) has exited: a pidfd
/// polls readable once it has.
pub(crate) fn pidfd_exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
}
