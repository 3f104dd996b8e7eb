//! `staunch bench store`: the config store against a single-node etcd
//! (Debian's etcd-server, fetched by scripts/etcd.sh and started here on
//! loopback) doing the equivalent operations: get, put, watch, txn. One
//! client, one request at a time, for both: what a component waiting on its
//! store sees. etcd is driven through its HTTP/JSON gateway (the project has
//! no gRPC stack), which adds a little per request on etcd's side; the
//! table says so. The two never run at the same time, and the benchmark
//! starts only with nothing else of the project running (see [`crate::idle`]).

use crate::guestrun::cache_dir;
use crate::idle::Machine;
use anyhow::{bail, Context, Result};
use staunch_store::client::{nul, Client};
use staunch_store::wire::Op;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn store(sock: &Path, data: &Path, standby: bool) -> Result<Proc> {
    let mut c = Command::new(std::env::current_exe()?);
    c.arg("store").arg("--socket").arg(sock).arg("--data").arg(data).args(["--scrub-secs", "0"]);
    if standby {
        c.arg("--standby");
    }
    Ok(Proc(c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?))
}

/// Spawn-to-first-answer: the time a restarted store needs to serve.
fn until_serving(sock: &Path, spawn: impl FnOnce() -> Result<Proc>) -> Result<(Proc, f64)> {
    let _ = std::fs::remove_file(sock);
    let t = Instant::now();
    let p = spawn()?;
    loop {
        if Client::connect(sock).and_then(|mut c| c.read_value(0, "/")).is_ok() {
            return Ok((p, t.elapsed().as_secs_f64() * 1e3));
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the store did not come up");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn b64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// A keep-alive HTTP/1.1 connection to etcd's JSON gateway.
struct Http {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Http {
    fn connect(port: u16) -> Result<Http> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        Ok(Http { r: BufReader::new(s.try_clone()?), w: s })
    }

    fn send(&mut self, path: &str, body: &str) -> Result<()> {
        write!(
            self.w,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        Ok(())
    }

    /// Headers; returns (content-length, chunked).
    fn headers(&mut self) -> Result<(Option<usize>, bool)> {
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        if !line.starts_with("HTTP/1.1 200") {
            bail!("etcd: {}", line.trim());
        }
        let (mut len, mut chunked) = (None, false);
        loop {
            line.clear();
            self.r.read_line(&mut line)?;
            let l = line.trim().to_ascii_lowercase();
            if l.is_empty() {
                return Ok((len, chunked));
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse().ok();
            }
            if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
        }
    }

    fn chunk(&mut self) -> Result<String> {
        let mut line = String::new();
        self.r.read_line(&mut line)?;
        let n = usize::from_str_radix(line.trim(), 16).context("chunk size")?;
        let mut b = vec![0u8; n + 2];
        self.r.read_exact(&mut b)?;
        b.truncate(n);
        Ok(String::from_utf8_lossy(&b).into_owned())
    }

    fn post(&mut self, path: &str, body: &str) -> Result<String> {
        self.send(path, body)?;
        let (len, chunked) = self.headers()?;
        if chunked {
            let mut out = String::new();
            loop {
                let c = self.chunk()?;
                if c.is_empty() {
                    return Ok(out);
                }
                out.push_str(&c);
            }
        }
        let mut b = vec![0u8; len.unwrap_or(0)];
        self.r.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
}

/// Two loopback ports free right now, for etcd's clients and its peer
/// (a fixed port would meet another run's etcd, and measure that one).
fn free_ports() -> Result<(u16, u16)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn etcd(bin: &Path, dir: &Path, (port, peer): (u16, u16)) -> Result<Proc> {
    let mut c = Command::new(bin);
    c.arg("--data-dir").arg(dir).args(["--name", "bench"]);
    c.arg("--listen-client-urls").arg(format!("http://127.0.0.1:{port}"));
    c.arg("--advertise-client-urls").arg(format!("http://127.0.0.1:{port}"));
    c.arg("--listen-peer-urls").arg(format!("http://127.0.0.1:{peer}"));
    c.arg("--initial-advertise-peer-urls").arg(format!("http://127.0.0.1:{peer}"));
    c.arg("--initial-cluster").arg(format!("bench=http://127.0.0.1:{peer}"));
    Ok(Proc(c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?))
}

fn etcd_until_serving(port: u16, spawn: impl FnOnce() -> Result<Proc>) -> Result<(Proc, f64)> {
    let t = Instant::now();
    let mut p = spawn()?;
    loop {
        if let Some(st) = p.0.try_wait()? {
            bail!("etcd exited ({st}) before serving");
        }
        let probe = format!("{{\"key\":\"{}\"}}", b64(b"/probe"));
        if Http::connect(port).and_then(|mut h| h.post("/v3/kv/range", &probe)).is_ok() {
            return Ok((p, t.elapsed().as_secs_f64() * 1e3));
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("etcd did not come up");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn rate(n: usize, t: Instant) -> f64 {
    n as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The rounds of one row on one side, failures included.
#[derive(Default)]
struct Side {
    values: Vec<f64>,
    failed: usize,
}

impl Side {
    /// One round: its value, or its failure, counted and said.
    fn attempt(&mut self, what: &str, f: impl FnOnce() -> Result<f64>) {
        match f() {
            Ok(v) => self.values.push(v),
            Err(e) => self.fail(what, &e),
        }
    }

    fn fail(&mut self, what: &str, e: &anyhow::Error) {
        self.failed += 1;
        eprintln!("  FAILED round ({what}): {e:#}");
    }

    fn median(&self) -> Option<f64> {
        (!self.values.is_empty()).then(|| median(self.values.clone()))
    }

    fn rounds(&self) -> String {
        format!("{} / {}", self.values.len(), self.failed)
    }
}

struct Row {
    what: String,
    unit: &'static str,
    staunch: Side,
    /// None: etcd has no such operation here.
    etcd: Option<Side>,
    /// Higher is better (rates) or lower is better (times).
    higher: bool,
}

impl Row {
    fn new(what: String, unit: &'static str, higher: bool, peer: bool) -> Row {
        Row { what, unit, staunch: Side::default(), etcd: peer.then(Side::default), higher }
    }

    fn etcd(&mut self) -> &mut Side {
        self.etcd.get_or_insert_with(Side::default)
    }
}

const RESTARTS: usize = 3;

pub fn run(quick: bool, machine: &Machine) -> Result<i32> {
    let n = if quick { 200 } else { 3000 };
    let dir = cache_dir().join(format!("bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let etcd_bin = {
        let p = cache_dir().join("etcd/root/usr/bin/etcd");
        p.exists().then_some(p)
    };
    match &etcd_bin {
        Some(p) => eprintln!("peer: etcd 3.4.23 ({})", p.display()),
        None => eprintln!("peer: etcd not found (run scripts/etcd.sh); Staunch column only"),
    }
    let peer = etcd_bin.is_some();
    let k = |q: usize| if quick { q / 10 } else { q };
    let failovers = if quick { 1 } else { 3 };
    let (w, r, wt, tx) = (n, n * 5, n / 5, n / 2);
    let mut rows = [
        Row::new(format!("writes (put), 1 client, {w} per round"), "ops/s", true, peer),
        Row::new(format!("reads (get), 1 client, {r} per round"), "ops/s", true, peer),
        Row::new(format!("watch: write to event, p50 of {wt} per round"), "ms", false, peer),
        Row::new(format!("transactions (read+write, commit), {tx} per round"), "ops/s", true, peer),
        Row::new("failover gap (kill -9 of the primary)".into(), "ms", false, false),
        Row::new(format!("restart to serving, {} nodes", k(10_000)), "ms", false, peer),
        Row::new(format!("restart to serving, {} nodes", k(100_000)), "ms", false, peer),
    ];

    // Staunch: reads, writes, watch latency, transactions.
    machine.settle()?;
    let sock = dir.join("xs.sock");
    let (primary, _) = until_serving(&sock, || store(&sock, &dir.join("data"), false))?;
    let mut c = Client::connect(&sock)?;
    eprintln!("staunch store: {n} writes, reads, watches, transactions ...");
    rows[0].staunch.attempt("Staunch writes", || {
        let t = Instant::now();
        for i in 0..w {
            c.write_value(0, &format!("/bench/k{}", i % 100), b"value-0123456789")?.map_err(anyhow::Error::msg)?;
        }
        Ok(rate(w, t))
    });
    rows[1].staunch.attempt("Staunch reads", || {
        let t = Instant::now();
        for i in 0..r {
            c.read_value(0, &format!("/bench/k{}", i % 100))?.map_err(anyhow::Error::msg)?;
        }
        Ok(rate(r, t))
    });
    rows[2].staunch.attempt("Staunch watch", || {
        let mut w = Client::connect(&sock)?;
        w.request(Op::Watch, 0, &nul(&["/watched", "t"]))?.map_err(anyhow::Error::msg)?;
        w.next_event(Duration::from_secs(2))?;
        let mut lat = Vec::new();
        for i in 0..wt {
            let t = Instant::now();
            c.write_value(0, "/watched/x", i.to_string().as_bytes())?.map_err(anyhow::Error::msg)?;
            w.next_event(Duration::from_secs(2))?.context("no watch event")?;
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(lat))
    });
    rows[3].staunch.attempt("Staunch transactions", || {
        let t = Instant::now();
        for i in 0..tx {
            let tx = c.transaction_start()?.map_err(anyhow::Error::msg)?;
            c.read_value(tx, "/bench/k0")?.map_err(anyhow::Error::msg)?;
            c.write_value(tx, "/bench/k0", i.to_string().as_bytes())?.map_err(anyhow::Error::msg)?;
            c.transaction_end(tx, true)?.map_err(anyhow::Error::msg)?;
        }
        Ok(rate(tx, t))
    });

    // Failover: a standby follows; the primary is SIGKILLed under writes.
    let standby = store(&sock, &dir.join("standby"), true)?;
    std::thread::sleep(Duration::from_millis(300));
    let mut prim = primary;
    let mut stby = standby;
    for round in 0..failovers {
        rows[4].staunch.attempt("Staunch failover", || {
            let mut last_ok = Instant::now();
            let mut gap = 0.0f64;
            for i in 0..400 {
                if i == 150 {
                    let _ = prim.0.kill();
                    let _ = prim.0.wait();
                }
                c.write_value(0, "/failover", i.to_string().as_bytes())?.map_err(anyhow::Error::msg)?;
                gap = gap.max(last_ok.elapsed().as_secs_f64() * 1e3);
                last_ok = Instant::now();
            }
            Ok(gap)
        });
        // The standby now serves; a new standby follows it.
        prim = stby;
        stby = store(&sock, &dir.join(format!("standby{round}")), true)?;
        std::thread::sleep(Duration::from_millis(300));
    }
    drop((prim, stby, c));

    // Restart-to-serving with 10k and 100k nodes (a snapshot plus a log).
    for (i, nodes) in [10_000usize, 100_000].into_iter().enumerate() {
        let nodes = k(nodes);
        machine.settle()?;
        eprintln!("staunch store: restart with {nodes} nodes ...");
        let data = dir.join(format!("data-{nodes}"));
        let setup = until_serving(&sock, || store(&sock, &data, false)).and_then(|(p, _)| {
            populate_staunch(&mut Client::connect(&sock)?, nodes)?;
            drop(p);
            Ok(())
        });
        let side = &mut rows[5 + i].staunch;
        match setup {
            Ok(()) => (0..RESTARTS).for_each(|_| {
                side.attempt("Staunch restart", || {
                    let (p, t) = until_serving(&sock, || store(&sock, &data, false))?;
                    drop(p);
                    Ok(t)
                })
            }),
            Err(e) => (0..RESTARTS).for_each(|_| side.fail("Staunch restart: populating", &e)),
        }
    }

    // etcd, the same operations, alone on the machine.
    if let Some(bin) = &etcd_bin {
        machine.settle()?;
        let ports = free_ports()?;
        let port = ports.0;
        eprintln!("etcd: {n} puts, gets, watches, txns ...");
        match etcd_until_serving(port, || etcd(bin, &dir.join("etcd"), ports)) {
            Ok((p, _)) => {
                etcd_ops(&mut rows, port, (w, r, wt, tx));
                drop(p);
            }
            Err(e) => rows[0..4].iter_mut().for_each(|row| row.etcd().fail("etcd", &e)),
        }
        for (i, nodes) in [10_000usize, 100_000].into_iter().enumerate() {
            let nodes = k(nodes);
            machine.settle()?;
            eprintln!("etcd: restart with {nodes} keys ...");
            let data = dir.join(format!("etcd-{nodes}"));
            let setup = etcd_until_serving(port, || etcd(bin, &data, ports)).and_then(|(p, _)| {
                populate_etcd(&mut Http::connect(port)?, nodes)?;
                drop(p);
                Ok(())
            });
            let side = rows[5 + i].etcd();
            match setup {
                Ok(()) => (0..RESTARTS).for_each(|_| {
                    side.attempt("etcd restart", || {
                        let (p, ms) = etcd_until_serving(port, || etcd(bin, &data, ports))?;
                        drop(p);
                        Ok(ms)
                    })
                }),
                Err(e) => (0..RESTARTS).for_each(|_| side.fail("etcd restart: populating", &e)),
            }
        }
    }
    machine.settle()?;

    println!();
    machine.banner();
    println!(
        "| {} | unit | Staunch | etcd 3.4 | Staunch/etcd | rounds ok / failed (Staunch; etcd) |",
        machine.head("config store")
    );
    println!("|---|---|---:|---:|---:|---:|");
    for r in &rows {
        let s = r.staunch.median();
        let e = r.etcd.as_ref().and_then(Side::median);
        let f = |v: Option<f64>| v.map(|v| format!("{v:.2}")).unwrap_or_else(|| "-".into());
        let ratio = match (s, e) {
            (Some(s), Some(e)) if e > 0.0 => {
                let better = if (r.higher && s > e) || (!r.higher && s < e) { " (better)" } else { "" };
                format!("{:.3}{better}", s / e)
            }
            _ => "-".into(),
        };
        let er = r.etcd.as_ref().map(Side::rounds).unwrap_or_else(|| "-".into());
        println!("| {} | {} | {} | {} | {ratio} | {}; {er} |", r.what, r.unit, f(s), f(e), r.staunch.rounds());
    }
    println!();
    println!(
        "one client, one request at a time, unix socket (Staunch) vs loopback HTTP/JSON gateway (etcd); every write is fsynced by both; failover: longest gap between a client's acknowledged writes around the kill, client reconnect included; restart: median of {RESTARTS} restarts each; medians over the rounds that succeeded; failed rounds are reported on stderr and counted, never dropped; Staunch and etcd never ran at the same time"
    );
    machine.footer();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(0)
}

/// etcd's puts, gets, watches and transactions, into `rows[0..4]`.
fn etcd_ops(rows: &mut [Row], port: u16, (w, r, wt, tx): (usize, usize, usize, usize)) {
    let put = |h: &mut Http, k: &str, v: &str| {
        h.post("/v3/kv/put", &format!("{{\"key\":\"{}\",\"value\":\"{}\"}}", b64(k.as_bytes()), b64(v.as_bytes())))
    };
    let mut h = match Http::connect(port) {
        Ok(h) => h,
        Err(e) => return rows[0..4].iter_mut().for_each(|row| row.etcd().fail("etcd", &e)),
    };
    rows[0].etcd().attempt("etcd puts", || {
        let t = Instant::now();
        for i in 0..w {
            put(&mut h, &format!("/bench/k{}", i % 100), "value-0123456789")?;
        }
        Ok(rate(w, t))
    });
    rows[1].etcd().attempt("etcd gets", || {
        let t = Instant::now();
        for i in 0..r {
            h.post("/v3/kv/range", &format!("{{\"key\":\"{}\"}}", b64(format!("/bench/k{}", i % 100).as_bytes())))?;
        }
        Ok(rate(r, t))
    });
    rows[2].etcd().attempt("etcd watch", || {
        let mut wh = Http::connect(port)?;
        wh.send("/v3/watch", &format!("{{\"create_request\":{{\"key\":\"{}\"}}}}", b64(b"/watched/x")))?;
        let (_, chunked) = wh.headers()?;
        anyhow::ensure!(chunked, "etcd watch: expected a stream");
        wh.chunk()?; // the "created" message
        let mut lat = Vec::new();
        for i in 0..wt {
            let t = Instant::now();
            put(&mut h, "/watched/x", &i.to_string())?;
            let ev = wh.chunk()?;
            anyhow::ensure!(ev.contains("events"), "etcd watch: {ev}");
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(lat))
    });
    rows[3].etcd().attempt("etcd txns", || {
        let t = Instant::now();
        for i in 0..tx {
            // Read, then put if nobody changed it since: etcd's optimistic transaction.
            let r = h.post("/v3/kv/range", &format!("{{\"key\":\"{}\"}}", b64(b"/bench/k0")))?;
            let rev =
                r.split("\"mod_revision\":\"").nth(1).and_then(|s| s.split('"').next()).unwrap_or("0").to_string();
            let body = format!(
                "{{\"compare\":[{{\"key\":\"{k}\",\"target\":\"MOD\",\"mod_revision\":\"{rev}\"}}],\"success\":[{{\"request_put\":{{\"key\":\"{k}\",\"value\":\"{v}\"}}}}]}}",
                k = b64(b"/bench/k0"),
                v = b64(i.to_string().as_bytes())
            );
            let r = h.post("/v3/kv/txn", &body)?;
            anyhow::ensure!(r.contains("\"succeeded\":true"), "etcd txn: {r}");
        }
        Ok(rate(tx, t))
    });
}

/// `nodes` keys under /vm, in transactions of 100 puts.
fn populate_etcd(h: &mut Http, nodes: usize) -> Result<()> {
    for chunk in 0..nodes / 100 {
        let ops: Vec<String> = (0..100)
            .map(|j| {
                format!(
                    "{{\"request_put\":{{\"key\":\"{}\",\"value\":\"{}\"}}}}",
                    b64(format!("/vm/{chunk}/k{j}").as_bytes()),
                    b64(b"some-value")
                )
            })
            .collect();
        h.post("/v3/kv/txn", &format!("{{\"success\":[{}]}}", ops.join(",")))?;
    }
    Ok(())
}

/// `nodes` nodes under /vm, in transactions of 1000 writes; then a
/// compaction, so a restart loads a snapshot plus a short log.
fn populate_staunch(c: &mut Client, nodes: usize) -> Result<()> {
    for chunk in 0..nodes.div_ceil(1000) {
        let tx = c.transaction_start()?.map_err(anyhow::Error::msg)?;
        for j in 0..1000.min(nodes - chunk * 1000) {
            c.write_value(tx, &format!("/vm/{chunk}/k{j}"), b"some-value")?.map_err(anyhow::Error::msg)?;
        }
        c.transaction_end(tx, true)?.map_err(anyhow::Error::msg)?;
    }
    c.request(Op::Control, 0, &nul(&["compact"]))?.map_err(anyhow::Error::msg)?;
    for i in 0..50 {
        c.write_value(0, &format!("/tail/{i}"), b"x")?.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}
