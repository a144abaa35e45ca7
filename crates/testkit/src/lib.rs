//! Real servers for tests: `redis-server` and the MongoDB stand-in
//! (nx-27017 through `../shared/standin/nx_standin.py`), each on a free
//! loopback port, killed when dropped (and when the test process dies).
//!
//! With `CALLBOARD_TEST_MONGODB_URI` set, tests use that MongoDB (a real
//! replica set) instead of starting the stand-in; every test still gets a
//! database of its own ([`unique_db_name`]).
//!
//! Paths, overridable by the environment:
//! - `CALLBOARD_STANDIN_PYTHON`: the venv's python (`<workspace>/.venv/bin/python`);
//! - `CALLBOARD_STANDIN_SCRIPT`: the launcher (`<workspace>/../shared/standin/nx_standin.py`);
//! - `CALLBOARD_TEST_REDIS_SERVER`: the redis-server binary (`redis-server`);
//! - `CALLBOARD_TEST_REDIS_CLI`: the redis-cli binary (`redis-cli`).
//!
//! `CALLBOARD_TEST_REDIS_TOPOLOGY=cluster` makes [`Services`] start a real
//! Redis Cluster (three masters on loopback, `--cluster-enabled yes` and
//! `redis-cli --cluster create`) instead of one `redis-server`.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("{what} not found at {path}: {hint}")]
    Missing { what: &'static str, path: PathBuf, hint: &'static str },
    #[error("could not start {what}: {source}")]
    Spawn { what: &'static str, source: std::io::Error },
    #[error("{what} did not come up on port {port} within {secs}s; log: {log}")]
    NotReady { what: &'static str, port: u16, secs: u64, log: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis-cli: {0}")]
    Cli(String),
}

const READY_TIMEOUT: Duration = Duration::from_secs(20);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// A free loopback port. Another process may take it before we bind it;
/// callers retry a start that fails.
pub fn free_port() -> Result<u16, TestkitError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A database name no other test in this run uses.
pub fn unique_db_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}_{}_{}_{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A child process killed on drop, and by the kernel if this process dies.
#[derive(Debug)]
pub struct Guarded(Child);

impl Guarded {
    /// Starts `cmd` with its output in `log`.
    pub fn spawn(cmd: Command, what: &'static str, log: &Path) -> Result<Self, TestkitError> {
        spawn_guarded(cmd, what, log)
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// SIGTERM, then waits (up to 10 s) for the process to exit on its own.
    pub fn terminate(&mut self) {
        // SAFETY: a signal to our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGTERM, without waiting: what an orchestrator sends first.
    pub fn sigterm(&self) {
        // SAFETY: a signal to our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
    }

    /// Waits up to `timeout` for the process to exit; its status, if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.0.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    /// SIGSTOP: the process freezes, as in a long pause or a VM stall.
    pub fn pause(&self) {
        // SAFETY: a signal to our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGSTOP);
        }
    }

    /// SIGCONT: a paused process carries on.
    pub fn resume(&self) {
        // SAFETY: a signal to our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGCONT);
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_guarded(mut cmd: Command, what: &'static str, log: &Path) -> Result<Guarded, TestkitError> {
    let out = std::fs::File::create(log)?;
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
    // The kernel kills the child when the *thread* that spawned it exits
    // (PR_SET_PDEATHSIG follows the thread, not the process): start servers
    // from the test's own thread, not from a short-lived one.
    // SAFETY: prctl is async-signal-safe; it runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map(Guarded).map_err(|source| TestkitError::Spawn { what, source })
}

fn wait_for_port(child: &mut Guarded, what: &'static str, port: u16, log: &Path) -> Result<(), TestkitError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + READY_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.0.try_wait() {
            break;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            // Another process may have taken the port between our probe and
            // the child's bind: then the child exits, and the answer came
            // from someone else. Make sure the child is still there.
            std::thread::sleep(Duration::from_millis(100));
            if matches!(child.0.try_wait(), Ok(None)) {
                return Ok(());
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let tail = std::fs::read_to_string(log).unwrap_or_default();
    let tail: String = tail.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
    Err(TestkitError::NotReady { what, port, secs: READY_TIMEOUT.as_secs(), log: tail })
}

/// A `redis-server` with no persistence.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    child: Guarded,
}

impl RedisServer {
    pub fn start(dir: &Path) -> Result<Self, TestkitError> {
        let bin = std::env::var("CALLBOARD_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut last = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut cmd = Command::new(&bin);
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ]);
            cmd.arg("--dir").arg(dir);
            let log = dir.join(format!("redis-{port}.log"));
            let mut child = spawn_guarded(cmd, "redis-server (apt-get install redis-server, or `make test`)", &log)?;
            match wait_for_port(&mut child, "redis-server", port, &log) {
                Ok(()) => return Ok(Self { port, child }),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs the server (its data is gone: no persistence).
    pub fn kill(&mut self) {
        self.child.kill();
    }

    /// Starts an empty server again on the same port.
    pub fn restart(&mut self, dir: &Path) -> Result<(), TestkitError> {
        self.child.kill();
        let bin = std::env::var("CALLBOARD_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut cmd = Command::new(&bin);
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        cmd.arg("--dir").arg(dir);
        let log = dir.join(format!("redis-{}-restarted.log", self.port));
        let mut child = spawn_guarded(cmd, "redis-server", &log)?;
        wait_for_port(&mut child, "redis-server", self.port, &log)?;
        self.child = child;
        Ok(())
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A real Redis Cluster on loopback: `masters` masters, each with
/// `replicas` replicas, created with `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

#[derive(Debug)]
struct ClusterNode {
    port: u16,
    bus: u16,
    child: Option<Guarded>,
}

fn redis_cli() -> String {
    std::env::var("CALLBOARD_TEST_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into())
}

impl RedisCluster {
    pub fn start(dir: &Path, masters: usize, replicas: usize) -> Result<Self, TestkitError> {
        let dir = dir.join(format!("cluster-{}", free_port()?));
        std::fs::create_dir_all(&dir)?;
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let mut node = ClusterNode { port: 0, bus: 0, child: None };
            let mut last = None;
            for _ in 0..5 {
                (node.port, node.bus) = (free_port()?, free_port()?);
                match Self::launch(&dir, &mut node) {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            if let Some(e) = last {
                return Err(e);
            }
            nodes.push(node);
        }
        let mut create = Command::new(redis_cli());
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out =
            create.output().map_err(|source| TestkitError::Spawn { what: "redis-cli --cluster create", source })?;
        if !out.status.success() {
            return Err(TestkitError::NotReady {
                what: "redis cluster",
                port: nodes[0].port,
                secs: 0,
                log: String::from_utf8_lossy(&out.stdout).lines().rev().take(5).collect::<Vec<_>>().join(" | "),
            });
        }
        let cluster = Self { nodes, dir };
        cluster.wait_until_ok()?;
        Ok(cluster)
    }

    fn launch(dir: &Path, node: &mut ClusterNode) -> Result<(), TestkitError> {
        let bin = std::env::var("CALLBOARD_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut cmd = Command::new(&bin);
        let port = node.port.to_string();
        cmd.args(["--port", &port, "--cluster-port", &node.bus.to_string(), "--bind", "127.0.0.1"]);
        cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--appendonly", "no", "--save", ""]);
        // A replica may take over however long it lagged: the tests make it.
        cmd.args(["--cluster-replica-validity-factor", "0"]);
        // Replicas sync at once (not after the default 5 s delay).
        cmd.args(["--repl-diskless-sync-delay", "0"]);
        cmd.arg("--cluster-config-file").arg(format!("nodes-{port}.conf"));
        cmd.arg("--dbfilename").arg(format!("dump-{port}.rdb"));
        cmd.arg("--dir").arg(dir);
        let log = dir.join(format!("redis-{port}.log"));
        let mut child = spawn_guarded(cmd, "redis-server (apt-get install redis-server, or `make test`)", &log)?;
        wait_for_port(&mut child, "redis-server", node.port, &log)?;
        node.child = Some(child);
        Ok(())
    }

    /// Polls every running node until it reports `cluster_state:ok` and
    /// agrees on the slot map, every running replica is in sync, and every
    /// running node's `CLUSTER NODES` shows each running replica with its
    /// master (gossip can lag the replica's own view: a test that asks
    /// [`RedisCluster::owners_of`] for a master's replicas must find them).
    pub fn wait_until_ok(&self) -> Result<(), TestkitError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if self.ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestkitError::NotReady {
                    what: "redis cluster",
                    port: self.nodes[0].port,
                    secs: READY_TIMEOUT.as_secs(),
                    log: "cluster_state never became ok".into(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One poll of [`RedisCluster::wait_until_ok`]: each running node read
    /// once (`CLUSTER INFO`, `INFO replication`, `CLUSTER NODES`).
    fn ready(&self) -> bool {
        let mut views = Vec::new();
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let (Ok(info), Ok(replication), Ok(nodes)) = (
                self.cli(n.port, &["cluster", "info"]),
                self.cli(n.port, &["info", "replication"]),
                self.cli(n.port, &["cluster", "nodes"]),
            ) else {
                return false;
            };
            let ok = info.contains("cluster_state:ok")
                && info.contains("cluster_slots_ok:16384")
                && (replication.contains("role:master") || replication.contains("master_link_status:up"));
            if !ok {
                return false;
            }
            let seen: Vec<ClusterNodeInfo> = nodes.lines().filter_map(ClusterNodeInfo::parse).collect();
            views.push((n.port, replication.contains("role:slave"), seen));
        }
        // Every running replica is listed with a master by every running node.
        views.iter().filter(|(_, replica, _)| *replica).all(|(port, _, _)| {
            views.iter().all(|(_, _, seen)| seen.iter().any(|n| n.port == *port && !n.master && n.master_id.is_some()))
        })
    }

    /// The seed nodes, as `CALLBOARD_REDIS_CLUSTER_NODES` takes them.
    pub fn seeds(&self) -> String {
        self.nodes.iter().map(|n| format!("redis://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// Runs `redis-cli -p port args...` and returns its output.
    pub fn cli(&self, port: u16, args: &[&str]) -> Result<String, TestkitError> {
        let out = Command::new(redis_cli()).arg("-p").arg(port.to_string()).args(args).output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&mut self, port: u16) {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.port == port) {
            n.child = None;
        }
    }

    /// Starts the node on `port` again (after [`RedisCluster::kill`]), with
    /// its cluster configuration and whatever RDB snapshot it last saved.
    pub fn restart(&mut self, port: u16) -> Result<(), TestkitError> {
        let dir = self.dir.clone();
        let node = self.nodes.iter_mut().find(|n| n.port == port).ok_or(TestkitError::NotReady {
            what: "redis cluster node",
            port,
            secs: 0,
            log: "no such node".into(),
        })?;
        node.child = None;
        Self::launch(&dir, node)
    }

    /// SIGSTOP (`true`) or SIGCONT the node on `port`.
    pub fn pause(&self, port: u16, stop: bool) {
        if let Some(child) = self.nodes.iter().find(|n| n.port == port).and_then(|n| n.child.as_ref()) {
            if stop {
                child.pause()
            } else {
                child.resume()
            }
        }
    }

    /// The cluster as a running node sees it (`CLUSTER NODES`).
    pub fn topology(&self) -> Result<Vec<ClusterNodeInfo>, TestkitError> {
        for n in self.nodes.iter().filter(|n| n.child.is_some()) {
            let text = self.cli(n.port, &["cluster", "nodes"])?;
            let nodes: Vec<ClusterNodeInfo> = text.lines().filter_map(ClusterNodeInfo::parse).collect();
            if !nodes.is_empty() {
                return Ok(nodes);
            }
        }
        Err(TestkitError::NotReady { what: "redis cluster", port: 0, secs: 0, log: "no node answers".into() })
    }

    /// The master serving `slot`, and its replicas, as ports.
    pub fn owners_of(&self, slot: u16) -> Result<(u16, Vec<u16>), TestkitError> {
        let nodes = self.topology()?;
        let master = nodes
            .iter()
            .find(|n| n.master && n.slots.iter().any(|(lo, hi)| (*lo..=*hi).contains(&slot)))
            .ok_or(TestkitError::NotReady {
                what: "redis cluster",
                port: 0,
                secs: 0,
                log: format!("slot {slot} unserved"),
            })?;
        let replicas = nodes.iter().filter(|n| n.master_id.as_deref() == Some(&master.id)).map(|n| n.port).collect();
        Ok((master.port, replicas))
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct ClusterNodeInfo {
    pub id: String,
    pub port: u16,
    pub master: bool,
    /// Up: not flagged `fail` or `fail?`.
    pub up: bool,
    pub master_id: Option<String>,
    pub slots: Vec<(u16, u16)>,
}

impl ClusterNodeInfo {
    fn parse(line: &str) -> Option<Self> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = f.get(1)?.split('@').next()?.rsplit(':').next()?.parse().ok()?;
        let flags = f.get(2)?;
        let slots = f
            .iter()
            .skip(8)
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((lo, hi)) => Some((lo.parse().ok()?, hi.parse().ok()?)),
                None => s.parse().ok().map(|x| (x, x)),
            })
            .collect();
        Some(Self {
            id: f[0].to_string(),
            port,
            master: flags.contains("master"),
            up: !flags.contains("fail"),
            master_id: f.get(3).filter(|m| **m != "-").map(|m| m.to_string()),
            slots,
        })
    }
}

/// The Redis a test runs against.
#[derive(Debug)]
pub enum TestRedis {
    Single(RedisServer),
    Cluster(RedisCluster),
}

impl TestRedis {
    /// One server, or with `CALLBOARD_TEST_REDIS_TOPOLOGY=cluster` a
    /// three-master cluster.
    pub fn start(dir: &Path) -> Result<Self, TestkitError> {
        if Self::cluster_wanted() {
            Ok(TestRedis::Cluster(RedisCluster::start(dir, 3, 0)?))
        } else {
            Ok(TestRedis::Single(RedisServer::start(dir)?))
        }
    }

    pub fn cluster_wanted() -> bool {
        std::env::var("CALLBOARD_TEST_REDIS_TOPOLOGY").is_ok_and(|t| t == "cluster")
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, TestRedis::Cluster(_))
    }

    /// The setting that points callboard at this Redis: variable, value.
    pub fn setting(&self) -> (&'static str, String) {
        match self {
            TestRedis::Single(s) => ("CALLBOARD_REDIS_URL", s.url()),
            TestRedis::Cluster(c) => ("CALLBOARD_REDIS_CLUSTER_NODES", c.seeds()),
        }
    }

    /// `redis-cli -p <port> args...` on every node (every master and
    /// replica of a cluster): (port, output) for each.
    pub fn cli_each(&self, args: &[&str]) -> Result<Vec<(u16, String)>, TestkitError> {
        let ports = match self {
            TestRedis::Single(s) => vec![s.port()],
            TestRedis::Cluster(c) => c.ports(),
        };
        ports
            .into_iter()
            .map(|port| {
                let out = Command::new(redis_cli())
                    .arg("-p")
                    .arg(port.to_string())
                    .args(args)
                    .output()
                    .map_err(|source| TestkitError::Spawn { what: "redis-cli", source })?;
                Ok((port, String::from_utf8_lossy(&out.stdout).into_owned()))
            })
            .collect()
    }

    /// `CONFIG SET name value` on every node.
    pub fn config_set(&self, name: &str, value: &str) -> Result<(), TestkitError> {
        for (port, reply) in self.cli_each(&["CONFIG", "SET", name, value])? {
            if reply.trim() != "OK" {
                return Err(TestkitError::Cli(format!("CONFIG SET {name} {value} on {port}: {reply}")));
            }
        }
        Ok(())
    }

    /// The single server, for tests of one node's faults.
    pub fn single(&mut self) -> Option<&mut RedisServer> {
        match self {
            TestRedis::Single(s) => Some(s),
            TestRedis::Cluster(_) => None,
        }
    }
}

/// Where the stand-in keeps its data.
#[derive(Debug, Clone)]
pub enum StandinStorage {
    /// One in-memory SQLite per database: fast, gone with the process.
    Memory,
    /// One file per database under this folder: survives a restart.
    DataDir(PathBuf),
}

/// The MongoDB stand-in, nx-27017 0.8.1 started through the shared launcher.
#[derive(Debug)]
pub struct Standin {
    port: u16,
    dir: PathBuf,
    storage: StandinStorage,
    child: Option<Guarded>,
}

impl Standin {
    pub fn python() -> PathBuf {
        std::env::var_os("CALLBOARD_STANDIN_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(".venv/bin/python"))
    }

    pub fn script() -> PathBuf {
        std::env::var_os("CALLBOARD_STANDIN_SCRIPT")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("../shared/standin/nx_standin.py"))
    }

    pub fn start(dir: &Path, storage: StandinStorage) -> Result<Self, TestkitError> {
        let mut last = None;
        for _ in 0..5 {
            let mut s = Self { port: free_port()?, dir: dir.to_path_buf(), storage: storage.clone(), child: None };
            match s.launch() {
                Ok(()) => return Ok(s),
                Err(e @ TestkitError::Missing { .. }) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn launch(&mut self) -> Result<(), TestkitError> {
        let python = Self::python();
        let script = Self::script();
        if !python.exists() {
            return Err(TestkitError::Missing {
                what: "the stand-in's python",
                path: python,
                hint: "run `make test` (it creates .venv), or set CALLBOARD_STANDIN_PYTHON",
            });
        }
        if !script.exists() {
            return Err(TestkitError::Missing {
                what: "nx_standin.py",
                path: script,
                hint: "../shared must sit beside the checkout, or set CALLBOARD_STANDIN_SCRIPT",
            });
        }
        let mut cmd = Command::new(python);
        cmd.arg(script).args(["-p", &self.port.to_string(), "--host", "127.0.0.1"]);
        match &self.storage {
            StandinStorage::Memory => cmd.args(["--db", "memory"]),
            StandinStorage::DataDir(d) => cmd.arg("--data-dir").arg(d),
        };
        cmd.arg("--pid-file").arg(self.dir.join(format!("nx-{}.pid", self.port)));
        cmd.arg("--log-file").arg(self.dir.join(format!("nx-{}.log", self.port)));
        let log = self.dir.join(format!("nx-{}.out", self.port));
        let mut child = spawn_guarded(cmd, "the MongoDB stand-in", &log)?;
        wait_for_port(&mut child, "MongoDB stand-in", self.port, &log)?;
        self.child = Some(child);
        Ok(())
    }

    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// Kills the server (SIGKILL): the fault a crash would cause.
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// Stops it with SIGTERM and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: sending a signal to our own child's pid.
            unsafe {
                libc::kill(c.0.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(c.0.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`): the server freezes, as in a
    /// long pause or a VM stall, with its connections open.
    pub fn pause(&self, stop: bool) {
        if let Some(c) = &self.child {
            if stop {
                c.pause()
            } else {
                c.resume()
            }
        }
    }

    /// Starts it again on the same port (with `DataDir`, with the same data).
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop();
        self.launch()
    }
}

/// Where a test's MongoDB lives.
#[derive(Debug)]
pub enum Mongo {
    Standin(Standin),
    /// `CALLBOARD_TEST_MONGODB_URI`: a real deployment.
    External(String),
}

impl Mongo {
    pub fn uri(&self) -> String {
        match self {
            Mongo::Standin(s) => s.uri(),
            Mongo::External(uri) => uri.clone(),
        }
    }

    pub fn is_external(&self) -> bool {
        matches!(self, Mongo::External(_))
    }
}

/// A test's servers: one Redis (or cluster), one MongoDB, one scratch folder.
#[derive(Debug)]
pub struct Services {
    pub redis: TestRedis,
    pub mongo: Mongo,
    pub dir: tempfile::TempDir,
}

impl Services {
    /// Redis, and the stand-in in memory unless `CALLBOARD_TEST_MONGODB_URI`
    /// names a real MongoDB.
    pub fn start() -> Result<Self, TestkitError> {
        Self::start_with(StandinStorage::Memory)
    }

    pub fn start_with(storage: StandinStorage) -> Result<Self, TestkitError> {
        Self::start_on(storage, TestRedis::start)
    }

    /// The stand-in in memory, and a Redis Cluster of `masters` masters
    /// with `replicas` replicas each, whatever the environment says.
    pub fn start_cluster(masters: usize, replicas: usize) -> Result<Self, TestkitError> {
        Self::start_on(StandinStorage::Memory, |dir| {
            Ok(TestRedis::Cluster(RedisCluster::start(dir, masters, replicas)?))
        })
    }

    fn start_on(
        storage: StandinStorage,
        redis: impl FnOnce(&Path) -> Result<TestRedis, TestkitError>,
    ) -> Result<Self, TestkitError> {
        let dir = tempfile::Builder::new().prefix("callboard-test-").tempdir()?;
        let redis = redis(dir.path())?;
        let mongo = match std::env::var("CALLBOARD_TEST_MONGODB_URI") {
            Ok(uri) if !uri.is_empty() => Mongo::External(uri),
            _ => {
                let storage = match storage {
                    StandinStorage::DataDir(d) if d.as_os_str().is_empty() => {
                        StandinStorage::DataDir(dir.path().join("nx-data"))
                    }
                    other => other,
                };
                if let StandinStorage::DataDir(d) = &storage {
                    std::fs::create_dir_all(d)?;
                }
                Mongo::Standin(Standin::start(dir.path(), storage)?)
            }
        };
        Ok(Self { redis, mongo, dir })
    }
}
