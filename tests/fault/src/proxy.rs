//! A user-space TCP proxy for one directed link (one node dialing another, or clients dialing a
//! node) that the harness can cut, heal, delay and make lossy while connections are open.
//!
//! A cut is a black hole, as a dropped-packets partition is: bytes already in flight stall,
//! new connections are accepted but carry nothing, and nothing is closed, so the endpoints only
//! notice through their own timeouts. On heal, stalled connections carry on (TCP loses
//! nothing); connections opened during the cut are closed, as their handshake would have
//! timed out. A lossy link closes a connection at random per chunk forwarded, as a reset does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a link does to traffic right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkState {
    /// Black-holed: nothing gets through, nothing is closed.
    pub cut: bool,
    /// Added before every chunk is forwarded, in each direction.
    pub delay: Duration,
    /// Chance, per thousand chunks, that the connection is reset.
    pub reset_per_mille: u32,
}

/// One directed link: listens on `addr()` and forwards to its target.
pub struct LinkProxy {
    addr: SocketAddr,
    state: watch::Sender<LinkState>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: JoinHandle<()>,
}

impl std::fmt::Debug for LinkProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkProxy")
            .field("addr", &self.addr)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl LinkProxy {
    /// Listens on `listener` and forwards every connection to `target`; `seed` fixes the
    /// random resets.
    pub fn start(listener: std::net::TcpListener, target: SocketAddr, seed: u64) -> Self {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("proxy address");
        let listener = TcpListener::from_std(listener).expect("tokio listener");
        let (state, rx) = watch::channel(LinkState::default());
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let t = Arc::clone(&tasks);
        let acceptor = tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((inbound, _)) = listener.accept().await {
                let _ = inbound.set_nodelay(true);
                n += 1;
                let rx = rx.clone();
                let rng = StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let h = tokio::spawn(serve(inbound, target, rx, rng));
                let mut tasks = t.lock().expect("tasks");
                tasks.retain(|h| !h.is_finished());
                tasks.push(h);
            }
        });
        LinkProxy {
            addr,
            state,
            tasks,
            acceptor,
        }
    }

    /// Where the link listens (what the dialing side is given as the target's address).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The link's current state.
    pub fn state(&self) -> LinkState {
        *self.state.borrow()
    }

    /// Sets the link's state; open connections follow at once.
    pub fn set(&self, s: LinkState) {
        self.state.send_replace(s);
    }

    /// Black-holes the link.
    pub fn cut(&self) {
        self.state.send_modify(|s| s.cut = true);
    }

    /// Back to a perfect link.
    pub fn heal(&self) {
        self.state.send_replace(LinkState::default());
    }

    /// Closes every open connection (both ends see a reset), as a restarted middlebox does.
    pub fn reset_all(&self) {
        for h in self.tasks.lock().expect("tasks").drain(..) {
            h.abort();
        }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        self.reset_all();
    }
}

async fn serve(
    inbound: TcpStream,
    target: SocketAddr,
    mut state: watch::Receiver<LinkState>,
    rng: StdRng,
) {
    // Opened while cut: hold it silently; when the cut heals, close it (its handshake would
    // have timed out on a real network).
    if state.borrow().cut {
        let _ = state.wait_for(|s| !s.cut).await;
        return;
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        return; // the target is down: the dialer sees the connection close
    };
    let _ = outbound.set_nodelay(true);
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    let rng = Arc::new(Mutex::new(rng));
    let up = pump(ri, wo, state.clone(), Arc::clone(&rng));
    let down = pump(ro, wi, state, rng);
    // Either direction ending (EOF, error, reset) ends both.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<LinkState>,
    rng: Arc<Mutex<StdRng>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Stalled while cut: nothing is read, so the sender's buffers fill as on a real link.
        if state.wait_for(|s| !s.cut).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        let s = *state.borrow();
        if s.reset_per_mille > 0
            && rng.lock().expect("rng").random_range(0..1000) < s.reset_per_mille
        {
            return; // dropping both halves closes both sockets
        }
        if !s.delay.is_zero() {
            tokio::time::sleep(s.delay).await;
        }
        // A cut that began meanwhile holds these bytes until it heals.
        if state.wait_for(|s| !s.cut).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server; returns its address.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        a
    }

    fn proxy_to(target: SocketAddr, seed: u64) -> LinkProxy {
        LinkProxy::start(
            std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
            target,
            seed,
        )
    }

    async fn roundtrip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(within, s.read_exact(&mut got))
            .await
            .ok()?
            .ok()?;
        Some(got)
    }

    #[tokio::test]
    async fn forwards_then_a_cut_stalls_and_a_heal_delivers_everything() {
        let p = proxy_to(echo().await, 1);
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut s, b"hello", Duration::from_secs(5)).await,
            Some(b"hello".to_vec())
        );
        p.cut();
        // Nothing comes back while cut, and the connection is not closed either.
        assert_eq!(
            roundtrip(&mut s, b"during", Duration::from_millis(300)).await,
            None
        );
        p.heal();
        let mut got = vec![0u8; 6];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("delivered after the heal")
            .unwrap();
        assert_eq!(&got, b"during");
    }

    #[tokio::test]
    async fn a_connection_opened_during_a_cut_carries_nothing_and_closes_on_heal() {
        let p = proxy_to(echo().await, 2);
        p.cut();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut s, b"x", Duration::from_millis(300)).await,
            None
        );
        p.heal();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed after the heal")
            .unwrap_or(0);
        assert_eq!(
            n, 0,
            "no echo ever comes through a connection opened while cut"
        );
        // New connections work again.
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut s, b"ok", Duration::from_secs(5)).await,
            Some(b"ok".to_vec())
        );
    }

    #[tokio::test]
    async fn delay_slows_each_direction_and_resets_close_connections() {
        let p = proxy_to(echo().await, 3);
        p.set(LinkState {
            delay: Duration::from_millis(150),
            ..Default::default()
        });
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        let t = std::time::Instant::now();
        assert!(
            roundtrip(&mut s, b"slow", Duration::from_secs(5))
                .await
                .is_some()
        );
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        p.set(LinkState {
            reset_per_mille: 1000,
            ..Default::default()
        });
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert_eq!(
            roundtrip(&mut s, b"gone", Duration::from_secs(2)).await,
            None
        );
        p.heal();
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert!(
            roundtrip(&mut s, b"back", Duration::from_secs(5))
                .await
                .is_some()
        );
    }

    #[tokio::test]
    async fn reset_all_closes_open_connections() {
        let p = proxy_to(echo().await, 4);
        let mut s = TcpStream::connect(p.addr()).await.unwrap();
        assert!(
            roundtrip(&mut s, b"a", Duration::from_secs(5))
                .await
                .is_some()
        );
        p.reset_all();
        let mut buf = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(r, Ok(0) | Err(_)));
    }
}
