//! Moving bytes between a process's pipe or pty and an attached connection, on the
//! agent's single-threaded runtime: every fd is non-blocking and waited on with
//! `AsyncFd`. Pipe↔socket transfers use `splice(2)`, which moves pages from the pipe
//! into the socket (or back) without passing through the agent; where the kernel
//! cannot splice (a pty, a socket type without splice support) it falls back to
//! read/write through a buffer.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::sys::socket::Shutdown;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::fds;

/// Most bytes one splice moves: one full pipe.
const SPLICE_CHUNK: usize = fds::PIPE_SIZE as usize;

/// Buffer of the read/write fallback.
const COPY_BUF: usize = 32 * 1024;

/// One direction of a stream: how it moves bytes, remembered across calls.
pub struct Transfer {
    /// `None` while splicing; the fallback's buffer once splice was refused.
    buf: Option<Box<[u8]>>,
    /// A pty master reports the slave's last close as EIO: end-of-file here.
    eio_is_eof: bool,
}

impl Transfer {
    pub fn splice() -> Self {
        Transfer {
            buf: None,
            eio_is_eof: false,
        }
    }

    /// Read/write only, for ptys (splice needs a pipe on one side).
    pub fn copy(eio_is_eof: bool) -> Self {
        Transfer {
            buf: Some(vec![0; COPY_BUF].into_boxed_slice()),
            eio_is_eof,
        }
    }

    /// Moves some bytes from `src` to `dst`; 0 means `src` reached end-of-file.
    pub async fn run<S, D>(&mut self, src: &AsyncFd<S>, dst: &AsyncFd<D>) -> io::Result<usize>
    where
        S: AsRawFd + AsFd,
        D: AsRawFd + AsFd,
    {
        if self.buf.is_none() {
            match splice_some(src, dst).await {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!("stdio: splice refused ({e}), copying instead");
                    self.buf = Some(vec![0; COPY_BUF].into_boxed_slice());
                }
                other => return other,
            }
        }
        let Some(buf) = self.buf.as_deref_mut() else {
            return Err(io::Error::other("no copy buffer"));
        };
        copy_some(src, dst, buf, self.eio_is_eof).await
    }
}

async fn splice_some<S, D>(src: &AsyncFd<S>, dst: &AsyncFd<D>) -> io::Result<usize>
where
    S: AsRawFd + AsFd,
    D: AsRawFd + AsFd,
{
    loop {
        let mut readable = src.readable().await?;
        let mut writable = dst.writable().await?;
        match fds::splice(src.get_ref().as_fd(), dst.get_ref().as_fd(), SPLICE_CHUNK) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Either side may be the one not ready: ask the kernel which, and forget
                // only that readiness (forgetting a ready side would wait forever).
                let (src_ready, dst_ready) =
                    fds::ready_now(src.get_ref().as_fd(), dst.get_ref().as_fd())?;
                if !src_ready {
                    readable.clear_ready();
                }
                if !dst_ready {
                    writable.clear_ready();
                }
                if src_ready && dst_ready {
                    // Changed in between (or a socket with room too small for a page):
                    // retry, but let other tasks run rather than spin.
                    drop((readable, writable));
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

async fn copy_some<S, D>(
    src: &AsyncFd<S>,
    dst: &AsyncFd<D>,
    buf: &mut [u8],
    eio_is_eof: bool,
) -> io::Result<usize>
where
    S: AsRawFd + AsFd,
    D: AsRawFd + AsFd,
{
    let n = loop {
        let mut guard = src.readable().await?;
        match guard.try_io(|fd| fds::read(fd.get_ref().as_fd(), buf)) {
            Ok(Err(e)) if eio_is_eof && e.raw_os_error() == Some(libc::EIO) => break 0,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(result) => break result?,
            Err(_would_block) => {}
        }
    };
    let mut done = 0;
    while done < n {
        let mut guard = dst.writable().await?;
        match guard.try_io(|fd| fds::write(fd.get_ref().as_fd(), &buf[done..n])) {
            Ok(Ok(k)) => done += k,
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => {}
        }
    }
    Ok(n)
}

/// Process output (a pipe's read end) to the host until the process closes it; then the
/// host reads end-of-file. If the host goes away first, the pipe is closed and the process
/// gets EPIPE on its next write.
pub async fn output<S: AsRawFd + AsFd>(pipe: AsyncFd<S>, socket: &AsyncFd<impl AsRawFd + AsFd>) {
    let mut transfer = Transfer::splice();
    loop {
        match transfer.run(&pipe, socket).await {
            Ok(0) => {
                fds::shutdown(socket.get_ref().as_fd(), Shutdown::Write);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("stdio: output stream ended: {e}");
                return;
            }
        }
    }
}

/// Host bytes to the process's stdin (a pipe's write end). Ends, closing the pipe so that
/// the process reads end-of-file, when the host shuts down its side, when `close` fires
/// (CloseStdin) or is dropped (the stream was released), or when the process has closed
/// its end of the pipe.
pub async fn input(
    socket: &AsyncFd<impl AsRawFd + AsFd>,
    pipe: AsyncFd<impl AsRawFd + AsFd>,
    close: oneshot::Receiver<()>,
) {
    let copy = async {
        let mut transfer = Transfer::splice();
        loop {
            match transfer.run(socket, &pipe).await {
                Ok(0) => return "the host closed stdin".to_owned(),
                Ok(_) => {}
                Err(e) => return format!("stdin stream ended: {e}"),
            }
        }
    };
    // A pipe whose reader is gone polls as an error: notice it while the host is quiet.
    let reader_gone = pipe.ready(Interest::ERROR);
    let why = tokio::select! {
        why = copy => why,
        _ = reader_gone => "the process closed its stdin".to_owned(),
        _ = close => "stdin closed by request".to_owned(),
    };
    tracing::debug!("stdio: {why}");
}

/// A terminal: pty output to the host, host bytes to the pty, until the process side is
/// gone (the last slave fd closed). Then the host reads end-of-file. The host shutting
/// down its side only stops input.
pub async fn terminal(master: AsyncFd<impl AsRawFd + AsFd>, socket: &AsyncFd<impl AsRawFd + AsFd>) {
    let out = async {
        let mut transfer = Transfer::copy(true);
        loop {
            match transfer.run(&master, socket).await {
                Ok(0) => {
                    fds::shutdown(socket.get_ref().as_fd(), Shutdown::Write);
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("stdio: terminal output ended: {e}");
                    return;
                }
            }
        }
    };
    let input = async {
        let mut transfer = Transfer::copy(false);
        loop {
            match transfer.run(socket, &master).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("stdio: terminal input ended: {e}");
                    break;
                }
            }
        }
        // Output goes on until the process is done.
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = out => {}
        () = input => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    /// Socket to pipe through both paths: splice, and the read/write fallback the guest
    /// uses where its kernel cannot splice from a vsock socket.
    #[tokio::test]
    async fn both_transfer_paths_move_bytes_and_report_eof() {
        for mut transfer in [Transfer::splice(), Transfer::copy(false)] {
            let (mut host, agent) = UnixStream::pair().expect("socketpair");
            let (pipe_r, pipe_w) = fds::pipe().expect("pipe");
            let agent: std::os::fd::OwnedFd = agent.into();
            fds::set_nonblocking(&agent).expect("nonblocking");
            fds::set_nonblocking(&pipe_w).expect("nonblocking");
            let socket = fds::register(agent).expect("register socket");
            let pipe = fds::register(pipe_w).expect("register pipe");
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            let writer = {
                let data = data.clone();
                std::thread::spawn(move || {
                    host.write_all(&data).expect("host write");
                })
            };
            let mut moved = 0;
            loop {
                match transfer.run(&socket, &pipe).await.expect("transfer") {
                    0 => break,
                    n => moved += n,
                }
                if moved == data.len() {
                    writer.join().expect("writer");
                    break;
                }
            }
            drop(pipe);
            let mut out = Vec::new();
            std::fs::File::from(pipe_r)
                .read_to_end(&mut out)
                .expect("read pipe");
            assert_eq!(out, data);
            // The host is gone (its socket dropped with the writer): end-of-file.
            let (_spare, pipe_w) = fds::pipe().expect("pipe");
            fds::set_nonblocking(&pipe_w).expect("nonblocking");
            let pipe = fds::register(pipe_w).expect("register pipe");
            assert_eq!(transfer.run(&socket, &pipe).await.expect("eof"), 0);
        }
    }
}
