//! Three `runneld` processes whose every link goes through a [`LinkProxy`] the harness owns:
//! one per directed node-to-node link (node `a` dials node `b` through `peer_link(a, b)`) and
//! one per node for clients (`client_link(n)`), which is also the client address every node
//! advertises. Processes can be killed, terminated, paused, resumed and restarted, and a
//! stopped node's newest files can be cut.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;

use crate::ports::{PortLock, free_port};
use crate::proxy::LinkProxy;

/// What a cluster's nodes run with beyond the harness defaults, for the faults that need it.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Each node's data directory is a tmpfs of this many MiB (mounting needs root or
    /// CAP_SYS_ADMIN): a small disk that [`FaultCluster::fill_disk`] can fill.
    pub disk_mib: Option<u64>,
    /// Each node's wall clock runs through libfaketime (monotonic time untouched), steppable
    /// with [`FaultCluster::step_clock`].
    pub fake_clock: bool,
    /// `storage.min_free_bytes`; `None`: the node's default.
    pub min_free_bytes: Option<u64>,
    /// `background.retention_check_ms`; 0: retention off.
    pub retention_check_ms: u64,
    /// `background.checkpoint_interval_ms`; `None`: the node's default.
    pub checkpoint_interval_ms: Option<u64>,
}

/// Where libfaketime lives (Debian's `faketime` package).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

impl Options {
    /// Raft timing and background settings every harness node runs with, plus these options.
    fn config(&self) -> String {
        let mut c = String::from(
            "[raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 1000\n\
             election_timeout_max_ms = 2000\n\n[background]\nleader_balance_ms = 2000\n",
        );
        c += &format!("retention_check_ms = {}\n", self.retention_check_ms);
        if let Some(ms) = self.checkpoint_interval_ms {
            c += &format!("checkpoint_interval_ms = {ms}\n");
        }
        if let Some(b) = self.min_free_bytes {
            c += &format!("\n[storage]\nmin_free_bytes = {b}\n");
        }
        c
    }
}

/// One node process.
#[derive(Debug)]
pub struct Node {
    /// Node id (1..=3).
    pub id: u64,
    /// Where its client listener really is.
    pub client: SocketAddr,
    /// Where its peer listener really is.
    pub peer: SocketAddr,
    /// Its data directory.
    pub data: PathBuf,
    /// Its log file (stdout and stderr, appended across restarts).
    pub log: PathBuf,
    child: Option<Child>,
    stopped: bool,
}

/// What a file cut did, for the history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Surgery {
    /// The file cut.
    pub file: PathBuf,
    /// Its length before.
    pub len_before: u64,
    /// Bytes removed from its end.
    pub cut: u64,
}

/// A bit flipped by the harness, for the history.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Flip {
    /// The file.
    pub file: PathBuf,
    /// The byte.
    pub position: u64,
    /// Which field of a batch (or which file) it hit.
    pub field: String,
}

/// Three proxied `runneld` processes.
pub struct FaultCluster {
    /// The nodes, index `id - 1`.
    pub nodes: Vec<Node>,
    peer_links: BTreeMap<(u64, u64), LinkProxy>,
    client_links: BTreeMap<u64, LinkProxy>,
    bin: PathBuf,
    dir: PathBuf,
    data_groups: u32,
    opts: Options,
    _ports: Vec<PortLock>,
}

impl std::fmt::Debug for FaultCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultCluster")
            .field("nodes", &self.nodes)
            .field("dir", &self.dir)
            .finish()
    }
}

fn bind_local() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a proxy port")
}

impl FaultCluster {
    /// Starts three nodes of `bin` (a `runneld`) under `dir`, with `data_groups` data groups;
    /// `seed` fixes the proxies' random resets. Must run inside a Tokio runtime.
    pub fn start(bin: &Path, dir: &Path, data_groups: u32, seed: u64) -> FaultCluster {
        Self::start_with(bin, dir, data_groups, seed, Options::default())
    }

    /// [`FaultCluster::start`] with `opts`.
    pub fn start_with(
        bin: &Path,
        dir: &Path,
        data_groups: u32,
        seed: u64,
        opts: Options,
    ) -> FaultCluster {
        std::fs::create_dir_all(dir).expect("cluster dir");
        std::fs::write(dir.join("runneld.toml"), opts.config()).expect("config");
        if opts.fake_clock {
            assert!(
                Path::new(LIBFAKETIME).exists(),
                "{LIBFAKETIME} is missing: apt-get install faketime"
            );
        }
        let mut ports = Vec::new();
        let mut nodes = Vec::new();
        for id in 1..=3u64 {
            let (c, p) = (free_port(), free_port());
            nodes.push(Node {
                id,
                client: SocketAddr::from(([127, 0, 0, 1], c.port)),
                peer: SocketAddr::from(([127, 0, 0, 1], p.port)),
                data: dir.join(format!("node-{id}")),
                log: dir.join(format!("node-{id}.log")),
                child: None,
                stopped: false,
            });
            ports.extend([c, p]);
        }
        let mut peer_links = BTreeMap::new();
        let mut client_links = BTreeMap::new();
        for a in &nodes {
            client_links.insert(
                a.id,
                LinkProxy::start(bind_local(), a.client, seed ^ (a.id << 8)),
            );
            for b in &nodes {
                if a.id != b.id {
                    let s = seed ^ (a.id << 16) ^ (b.id << 24);
                    peer_links.insert((a.id, b.id), LinkProxy::start(bind_local(), b.peer, s));
                }
            }
        }
        let mut c = FaultCluster {
            nodes,
            peer_links,
            client_links,
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            data_groups,
            opts,
            _ports: ports,
        };
        for id in 1..=3 {
            if let Some(mib) = c.opts.disk_mib {
                let data = c.nodes[id as usize - 1].data.clone();
                mount_tmpfs(&data, mib);
            }
            if c.opts.fake_clock {
                std::fs::write(c.clock_file(id), "+0\n").expect("clock file");
            }
            c.spawn(id);
        }
        c
    }

    fn clock_file(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.faketime"))
    }

    /// Steps node `id`'s wall clock to `offset` from the real one (libfaketime syntax: `+8d`,
    /// `-1h`, `+0`); monotonic time is untouched, as with an NTP step. Needs
    /// [`Options::fake_clock`].
    pub fn step_clock(&self, id: u64, offset: &str) {
        assert!(
            self.opts.fake_clock,
            "the cluster runs without a fake clock"
        );
        fsutil_write_atomic(&self.clock_file(id), format!("{offset}\n").as_bytes());
    }

    /// Fills node `id`'s small disk (see [`Options::disk_mib`]) with a filler file until the
    /// file system refuses more; returns the bytes written.
    pub fn fill_disk(&self, id: u64) -> u64 {
        use std::io::Write;
        assert!(
            self.opts.disk_mib.is_some(),
            "the cluster has no small disks"
        );
        let path = self.nodes[id as usize - 1].data.join("filler");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("filler");
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut written = 0u64;
        // Bounded by the disk's size: every round either writes a chunk or stops.
        let most = self.opts.disk_mib.unwrap_or(0) * 16 + 16;
        for _ in 0..most {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        let _ = f.sync_all();
        written
    }

    /// Makes node `id`'s WAL files immutable (`chattr +i`: every write fails with `EPERM`, even
    /// for root), or writable again: a disk that fails writes for a reason that does not heal.
    /// Returns whether `chattr` did it (it needs a file system with the attribute, as ext4).
    pub fn set_wal_immutable(&self, id: u64, on: bool) -> bool {
        let mut files = Vec::new();
        collect(&self.nodes[id as usize - 1].data, &mut files);
        let wals: Vec<PathBuf> = files
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "wal"))
            .collect();
        !wals.is_empty()
            && Command::new("chattr")
                .arg(if on { "+i" } else { "-i" })
                .args(&wals)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    }

    /// Removes the filler [`FaultCluster::fill_disk`] wrote on node `id`.
    pub fn free_disk(&self, id: u64) {
        let _ = std::fs::remove_file(self.nodes[id as usize - 1].data.join("filler"));
    }

    /// Flips one random bit in a random committed batch of a random partition segment of node
    /// `id` (running or not; data groups only): any field, header or records, in any segment,
    /// sealed, checkpointed or active.
    pub fn flip_batch_bit(&self, id: u64, rng: &mut StdRng) -> Option<Flip> {
        let mut files = Vec::new();
        collect(&self.nodes[id as usize - 1].data, &mut files);
        let segments: Vec<(PathBuf, Vec<(u64, u64)>)> = files
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "log"))
            .filter(|f| {
                let s = f.to_string_lossy();
                s.contains("/partitions/") && !s.contains("/groups/0/")
            })
            .filter_map(|f| {
                let b = batches(&f).ok()?;
                (!b.is_empty()).then_some((f, b))
            })
            .collect();
        if segments.is_empty() {
            return None;
        }
        let (file, batches) = &segments[rng.random_range(0..segments.len())];
        let (pos, len) = batches[rng.random_range(0..batches.len())];
        let at = rng.random_range(0..len);
        let bit = rng.random_range(0..8u8);
        flip(file, pos + at, 1 << bit).ok()?;
        Some(Flip {
            file: file.clone(),
            position: pos + at,
            field: field_name(at).to_string(),
        })
    }

    /// Flips one random bit of the current checkpoint manifest of a random data group of node
    /// `id` (which must not run).
    pub fn flip_manifest_bit(&self, id: u64, rng: &mut StdRng) -> Option<Flip> {
        assert!(!self.is_up(id), "manifest surgery on a running node");
        let mut files = Vec::new();
        collect(&self.nodes[id as usize - 1].data, &mut files);
        let manifests: Vec<PathBuf> = files
            .into_iter()
            .filter(|f| f.file_name().is_some_and(|n| n == "MANIFEST"))
            .filter(|f| !f.to_string_lossy().contains("/groups/0/"))
            .collect();
        if manifests.is_empty() {
            return None;
        }
        let file = manifests[rng.random_range(0..manifests.len())].clone();
        let len = std::fs::metadata(&file).ok()?.len();
        let at = rng.random_range(0..len);
        flip(&file, at, 1 << rng.random_range(0..8u8)).ok()?;
        Some(Flip {
            file,
            position: at,
            field: "checkpoint manifest".into(),
        })
    }

    /// Deletes the vote record (`wal.meta`) of a random data group of node `id` (which must
    /// not run), keeping a copy for [`FaultCluster::restore_wal_meta`]; returns its path.
    pub fn delete_wal_meta(&self, id: u64, rng: &mut StdRng) -> Option<PathBuf> {
        assert!(!self.is_up(id), "surgery on a running node");
        let g = rng.random_range(1..=u64::from(self.data_groups));
        let meta = self.nodes[id as usize - 1]
            .data
            .join(format!("groups/{g}/wal/wal.meta"));
        std::fs::copy(&meta, meta.with_extension("meta.kept")).ok()?;
        std::fs::remove_file(&meta).ok()?;
        Some(meta)
    }

    /// Puts back a vote record [`FaultCluster::delete_wal_meta`] removed.
    pub fn restore_wal_meta(&self, meta: &Path) {
        std::fs::rename(meta.with_extension("meta.kept"), meta).expect("restore wal.meta");
    }

    /// Waits (bounded) for node `id`'s process to exit by itself; its exit status, or `None`
    /// if it still runs after `limit`.
    pub fn wait_exit(&mut self, id: u64, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        let n = &mut self.nodes[id as usize - 1];
        while std::time::Instant::now() < deadline {
            let c = n.child.as_mut()?;
            if let Ok(Some(st)) = c.try_wait() {
                n.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Nodes whose process exited by itself (reaped), as a supervisor would see them.
    pub fn exited(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                n.child = None;
                out.push(n.id);
            }
        }
        out
    }

    /// Number of data groups (groups 1..=this; group 0 holds metadata).
    pub fn data_groups(&self) -> u32 {
        self.data_groups
    }

    /// The client addresses (the client proxies) of every node.
    pub fn bootstrap(&self) -> Vec<String> {
        self.client_links
            .values()
            .map(|l| l.addr().to_string())
            .collect()
    }

    /// The link node `from` dials node `to` through.
    pub fn peer_link(&self, from: u64, to: u64) -> &LinkProxy {
        &self.peer_links[&(from, to)]
    }

    /// The link clients reach node `id` through.
    pub fn client_link(&self, id: u64) -> &LinkProxy {
        &self.client_links[&id]
    }

    /// Every link: node-to-node and client-to-node.
    pub fn links(&self) -> impl Iterator<Item = &LinkProxy> {
        self.peer_links.values().chain(self.client_links.values())
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        for l in self.links() {
            l.heal();
        }
    }

    /// Cuts node `id` off from its peers, both ways (clients still reach it).
    pub fn isolate_from_peers(&self, id: u64) {
        for ((a, b), l) in &self.peer_links {
            if *a == id || *b == id {
                l.cut();
            }
        }
    }

    /// Cuts the links between `a` and `b`, both ways.
    pub fn cut_between(&self, a: u64, b: u64) {
        self.peer_link(a, b).cut();
        self.peer_link(b, a).cut();
    }

    fn nodes_arg(&self, me: u64) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let peer = if n.id == me {
                    n.peer.to_string()
                } else {
                    self.peer_links[&(me, n.id)].addr().to_string()
                };
                format!("{}={}/{}", n.id, peer, self.client_links[&n.id].addr())
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, id: u64) {
        let nodes_arg = self.nodes_arg(id);
        let config = self.dir.join("runneld.toml");
        let groups = self.data_groups;
        let (fake_clock, clock_file) = (self.opts.fake_clock, self.clock_file(id));
        let n = &mut self.nodes[id as usize - 1];
        assert!(n.child.is_none(), "node {id} already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("node log");
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&config)
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--data-dir")
            .arg(&n.data)
            .arg("--listen-client")
            .arg(n.client.to_string())
            .arg("--listen-peer")
            .arg(n.peer.to_string())
            .arg("--nodes")
            .arg(nodes_arg)
            .arg("--data-groups")
            .arg(groups.to_string())
            .env("RUST_LOG", "info,openraft=warn")
            .envs(clock_env(fake_clock, &clock_file))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn runneld");
        n.child = Some(child);
        n.stopped = false;
    }

    fn signal(&self, id: u64, sig: &str) {
        if let Some(c) = self.nodes[id as usize - 1].child.as_ref() {
            let _ = Command::new("kill")
                .arg(format!("-{sig}"))
                .arg(c.id().to_string())
                .status();
        }
    }

    /// Whether node `id` has a process (running or paused).
    pub fn is_up(&self, id: u64) -> bool {
        self.nodes[id as usize - 1].child.is_some()
    }

    /// Whether node `id` is paused (SIGSTOP).
    pub fn is_paused(&self, id: u64) -> bool {
        self.nodes[id as usize - 1].stopped
    }

    /// SIGKILLs node `id` and reaps it.
    pub fn kill(&mut self, id: u64) {
        let n = &mut self.nodes[id as usize - 1];
        if let Some(mut c) = n.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        n.stopped = false;
    }

    /// SIGTERMs node `id` and waits (bounded) for it to exit; SIGKILLs it after `grace`.
    /// Returns whether it exited by itself.
    pub fn terminate(&mut self, id: u64, grace: Duration) -> bool {
        if self.is_paused(id) {
            self.resume(id);
        }
        self.signal(id, "TERM");
        let n = &mut self.nodes[id as usize - 1];
        let Some(mut c) = n.child.take() else {
            return true;
        };
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// SIGSTOPs node `id`.
    pub fn pause(&mut self, id: u64) {
        self.signal(id, "STOP");
        self.nodes[id as usize - 1].stopped = true;
    }

    /// SIGCONTs node `id`.
    pub fn resume(&mut self, id: u64) {
        self.signal(id, "CONT");
        self.nodes[id as usize - 1].stopped = false;
    }

    /// Starts node `id` again on its data (no-op when it runs).
    pub fn restart(&mut self, id: u64) {
        if self.nodes[id as usize - 1].child.is_none() {
            self.spawn(id);
        }
    }

    /// Cuts the newest WAL file or the newest segment of node `id` (which must not run) by a
    /// random length, as a crash in the middle of a write would; `None` when it has no file.
    pub fn cut_newest_file(&self, id: u64, rng: &mut StdRng) -> Option<Surgery> {
        assert!(!self.is_up(id), "file surgery on a running node");
        let mut files = Vec::new();
        collect(&self.nodes[id as usize - 1].data, &mut files);
        // The newest WAL file of each group and the newest segment of each partition.
        let mut newest: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
        for f in files {
            let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
            let Some(parent) = f.parent() else { continue };
            let in_checkpoint = f.components().any(|c| c.as_os_str() == "checkpoints");
            if in_checkpoint || !(ext == "wal" || ext == "log") {
                continue;
            }
            let e = newest
                .entry(parent.to_path_buf())
                .or_insert_with(|| f.clone());
            if f > *e {
                *e = f;
            }
        }
        let candidates: Vec<PathBuf> = newest
            .into_values()
            .filter(|f| std::fs::metadata(f).map(|m| m.len() > 0).unwrap_or(false))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let file = candidates[rng.random_range(0..candidates.len())].clone();
        // Files are preallocated: cut from the end of the data, not of the zeros after it.
        let end = data_end(&file).ok()?;
        if end == 0 {
            return None;
        }
        let cut = rng.random_range(1..=end.min(64 * 1024));
        let f = std::fs::OpenOptions::new().write(true).open(&file).ok()?;
        f.set_len(end - cut).ok()?;
        f.sync_all().ok()?;
        Some(Surgery {
            file,
            len_before: end,
            cut,
        })
    }

    /// Groups (by WAL directory) whose replica is still catching up after a repair: it lost
    /// durable data and does not vote until it has it back (the `CATCH_UP` file).
    pub fn catching_up(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for n in &self.nodes {
            collect(&n.data, &mut files);
        }
        files
            .into_iter()
            .filter(|f| f.file_name().is_some_and(|n| n == "CATCH_UP"))
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect()
    }

    /// The last `lines` lines of every node's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let text = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            s += &format!("--- node {} ({}) ---\n", n.id, n.log.display());
            for l in tail.into_iter().rev() {
                s += l;
                s += "\n";
            }
        }
        s
    }
}

/// The environment that runs a process under libfaketime reading its offset from `file`.
fn clock_env(on: bool, file: &Path) -> Vec<(String, String)> {
    if !on {
        return Vec::new();
    }
    vec![
        ("LD_PRELOAD".into(), LIBFAKETIME.into()),
        (
            "FAKETIME_TIMESTAMP_FILE".into(),
            file.to_string_lossy().into_owned(),
        ),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

fn fsutil_write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn mount_tmpfs(dir: &Path, mib: u64) {
    std::fs::create_dir_all(dir).expect("data dir");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
        .arg(dir)
        .status()
        .expect("run mount");
    assert!(
        st.success(),
        "cannot mount a {mib} MiB tmpfs at {} (needs root or CAP_SYS_ADMIN)",
        dir.display()
    );
}

/// (position, length) of every batch of a segment file, up to its zeros.
fn batches(file: &Path) -> std::io::Result<Vec<(u64, u64)>> {
    let bytes = std::fs::read(file)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos + 61 <= bytes.len() {
        if bytes[pos..pos + 17].iter().all(|b| *b == 0) {
            break;
        }
        let len = u32::from_be_bytes(bytes[pos + 8..pos + 12].try_into().expect("4")) as usize;
        let total = 12 + len;
        if len < 49 || pos + total > bytes.len() {
            break;
        }
        out.push((pos as u64, total as u64));
        pos += total;
    }
    Ok(out)
}

/// The name of the batch field holding byte `at` of a batch.
fn field_name(at: u64) -> &'static str {
    match at {
        0..8 => "baseOffset",
        8..12 => "batchLength",
        12..16 => "partitionLeaderEpoch",
        16 => "magic",
        17..21 => "crc",
        21..61 => "header inside the CRC",
        _ => "records",
    }
}

fn flip(file: &Path, at: u64, mask: u8) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)?;
    f.write_all_at(&[b[0] ^ mask], at)
}

/// Length of `file` without its trailing zero bytes.
fn data_end(file: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file)?;
    let mut end = f.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut buf[..n])?;
        if let Some(i) = buf[..n].iter().rposition(|b| *b != 0) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect(&p, out);
        } else {
            out.push(p);
        }
    }
}

impl Drop for FaultCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            if self.opts.disk_mib.is_some() {
                let _ = Command::new("umount").arg("-l").arg(&n.data).status();
            }
        }
    }
}
