//! A real pseudo-terminal pair for serial tests: the test plays the sensor on the master, the
//! hub opens the slave path with tokio-serial exactly as it opens a USB adapter.

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(10);

/// One pseudo-terminal: the test holds the master (the sensor's end) and keeps the slave open
/// so the pair lives until `close`.
pub struct Pty {
    master: AsyncFd<OwnedFd>,
    _slave: OwnedFd,
    pub path: PathBuf,
    rbuf: std::sync::Mutex<Vec<u8>>,
}

impl Pty {
    pub fn open() -> Pty {
        let p = nix::pty::openpty(None, None).expect("openpty");
        // Raw mode from the start: no echo or line editing even before the hub opens the slave.
        let mut t = tcgetattr(&p.slave).unwrap();
        cfmakeraw(&mut t);
        tcsetattr(&p.slave, SetArg::TCSANOW, &t).unwrap();
        let path = nix::unistd::ttyname(&p.slave).expect("ttyname");
        let fl = nix::fcntl::fcntl(&p.master, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        let fl = nix::fcntl::OFlag::from_bits_truncate(fl) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&p.master, nix::fcntl::FcntlArg::F_SETFL(fl)).unwrap();
        Pty {
            // SAFETY: `OwnedFd` owns the master and nothing else closes or replaces it.
            master: unsafe { AsyncFd::register(p.master) }.unwrap(),
            _slave: p.slave,
            path,
            rbuf: Default::default(),
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) {
        while !data.is_empty() {
            let mut g = self.master.writable().await.unwrap();
            match g
                .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => panic!("pty write: {e}"),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn send(&self, line: &str) {
        self.write_all(format!("{line}\n").as_bytes()).await;
    }

    /// The next line the hub wrote, without its newline; `None` after `wait`.
    pub async fn line(&self, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut rbuf = self.rbuf.lock().unwrap();
                if let Some(i) = rbuf.iter().position(|&b| b == b'\n') {
                    let l: Vec<u8> = rbuf.drain(..=i).collect();
                    return Some(String::from_utf8_lossy(&l[..i]).into_owned());
                }
            }
            let mut g = tokio::time::timeout_at(deadline, self.master.readable())
                .await
                .ok()?
                .unwrap();
            let mut buf = [0u8; 4096];
            match g.try_io(|fd| {
                nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => self.rbuf.lock().unwrap().extend_from_slice(&buf[..n]),
                Ok(Err(e)) => panic!("pty read: {e}"),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next bytes the hub wrote (the line buffer must be empty); `None` after `wait`.
    pub async fn chunk(&self, wait: Duration) -> Option<Vec<u8>> {
        assert!(self.rbuf.lock().unwrap().is_empty());
        let deadline = Instant::now() + wait;
        loop {
            let mut g = tokio::time::timeout_at(deadline, self.master.readable())
                .await
                .ok()?
                .unwrap();
            let mut buf = vec![0u8; 64 * 1024];
            match g.try_io(|fd| {
                nix::unistd::read(fd.get_ref(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => {
                    buf.truncate(n);
                    return Some(buf);
                }
                Ok(Err(e)) => panic!("pty read: {e}"),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next line is `want`. A kv `reload` (the hub serves one whenever a port opens and
    /// when MODE's store arrives) is skipped unless it is what the test waits for.
    pub async fn expect(&self, want: &str) {
        loop {
            let got = self.line(T).await;
            if !want.contains("reload") && got.as_deref().is_some_and(|l| l.contains("reload")) {
                continue;
            }
            assert_eq!(got.as_deref(), Some(want));
            return;
        }
    }

    /// Nothing more arrives for `wait`.
    pub async fn quiet(&self, wait: Duration) {
        if let Some(l) = self.line(wait).await {
            panic!("unexpected line {l:?}");
        }
    }
}
