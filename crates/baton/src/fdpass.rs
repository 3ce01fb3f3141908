//! Passing file descriptors over Unix sockets (`SCM_RIGHTS`): the one
//! message layer under the take-over of an independently started process
//! and the systemd file descriptor store.
//!
//! A message is bytes with fds attached to its first byte. On a stream
//! socket the receiver reads with [`recv`], which stops at the end of the
//! segment that carried the fds (the kernel never merges a segment with fds
//! into one read with what follows), so a message sent with one [`send`]
//! that the peer answers before anything else is sent is read whole and
//! alone. Received fds are close-on-exec; a message with more fds than the
//! receiver has room for is an error, never a silent loss.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

/// Most fds one message carries (the kernel's `SCM_MAX_FD`).
pub(crate) const MAX_FDS: usize = 253;

/// Room for the control message of [`MAX_FDS`] fds.
const SPACE: usize = rustix::cmsg_space!(ScmRights(MAX_FDS));

/// One `sendmsg` of `bytes` with `fds` attached; returns how many bytes
/// went (on a stream socket the caller sends the rest without fds). Never
/// raises SIGPIPE.
pub(crate) fn send(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} fds in one message; at most {MAX_FDS}", fds.len()),
        ));
    }
    let mut space = [MaybeUninit::<u8>::uninit(); SPACE];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other(
            "no room for the fds in the control message",
        ));
    }
    let iov = [IoSlice::new(bytes)];
    Ok(rustix::net::sendmsg(
        socket,
        &iov,
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// One `recvmsg` into `buf`; fds that came with it are appended to `fds`.
/// Returns the number of bytes read (0: end of stream).
pub(crate) fn recv(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); SPACE];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let got = rustix::net::recvmsg(socket, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} fds in one message; the rest were lost"),
        ));
    }
    Ok(got.bytes)
}

/// Sends `bytes` with `fds` on a tokio stream, whole.
pub(crate) async fn send_all(
    stream: &tokio::net::UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes.len() {
        let with = if sent == 0 { fds } else { &[] };
        let n = stream
            .async_io(tokio::io::Interest::WRITABLE, || {
                send(stream.as_fd(), &bytes[sent..], with)
            })
            .await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "socket closed"));
        }
        sent += n;
    }
    Ok(())
}

/// Reads one line (up to and including `\n`, at most `limit` bytes) with
/// the fds that came with it, from a blocking stream (its read timeout
/// bounds each read). Returns `None` at end of stream before any byte.
/// Bytes after the newline in the same read are an error: the peer must
/// wait for an answer before it sends more.
pub(crate) fn recv_line(
    socket: BorrowedFd<'_>,
    limit: usize,
) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = recv(socket, &mut buf, &mut fds)?;
        if n == 0 {
            if line.is_empty() && fds.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed in the middle of a message",
            ));
        }
        let chunk = &buf[..n];
        if let Some(end) = chunk.iter().position(|&b| b == b'\n') {
            if end + 1 != n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "more data than one message before an answer",
                ));
            }
            line.extend_from_slice(chunk);
            return Ok(Some((line, fds)));
        }
        line.extend_from_slice(chunk);
        if line.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message longer than {limit} bytes"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_line_with_fds_arrives_whole_with_its_fds() {
        let (a, b) = UnixStream::pair().unwrap();
        let (p, q) = UnixStream::pair().unwrap();
        let n = send(a.as_fd(), b"{\"x\":1}\n", &[p.as_fd(), q.as_fd()]).unwrap();
        assert_eq!(n, 8);
        let (line, fds) = recv_line(b.as_fd(), 1024).unwrap().unwrap();
        assert_eq!(line, b"{\"x\":1}\n");
        assert_eq!(fds.len(), 2);
        // The received fd is the same socket: what goes in one end comes
        // out of the other.
        let mut got_p = UnixStream::from(fds.into_iter().next().unwrap());
        got_p.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut &q, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn end_of_stream_and_trailing_bytes_are_told_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(a);
        assert!(recv_line(b.as_fd(), 1024).unwrap().is_none());
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"one\ntwo\n").unwrap();
        assert!(recv_line(b.as_fd(), 1024).is_err());
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&[b'x'; 100]).unwrap();
        drop(a);
        assert!(recv_line(b.as_fd(), 10).is_err());
    }

    #[test]
    fn too_many_fds_are_refused_before_sending() {
        let (a, _b) = UnixStream::pair().unwrap();
        let fds: Vec<BorrowedFd<'_>> = (0..=MAX_FDS).map(|_| a.as_fd()).collect();
        assert!(send(a.as_fd(), b"x", &fds).is_err());
    }
}
