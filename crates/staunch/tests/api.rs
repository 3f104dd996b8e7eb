//! `staunch api` against a real host (`staunch host`, the store, test
//! guests under KVM): operations through the REST API, judged by the
//! guest's own reports and the host's state; a SIGKILL of the API inside
//! an operation's phases, resumed by the next API process exactly once;
//! bad input refused with JSON errors and no change.

mod common;
mod hosthelp;

use common::{require_kvm, staunch};
use hosthelp::Host;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// One HTTP/1.1 request on the API's unix socket: status, body.
fn http(sock: &Path, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: staunch\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    (code, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn j(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

struct Api {
    sock: PathBuf,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
}

impl Api {
    fn start(h: &Host, crash: &str) -> Api {
        let sock = h.run.join("api.sock");
        let mut a = Api { sock, child: None, config: h.config.clone(), log: h.dir.join("api.log") };
        a.spawn(crash);
        a
    }

    fn spawn(&mut self, crash: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut c = staunch();
        c.arg("api")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if !crash.is_empty() {
            c.env("STAUNCH_API_CRASH", crash);
        }
        self.child = Some(c.spawn().unwrap());
        let t = Instant::now();
        while UnixStream::connect(&self.sock).is_err() || http(&self.sock, "GET", "/v1/ping", &[], b"").0 != 200 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the API did not serve: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let b = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
        let (code, text) = http(&self.sock, method, path, &[], &b);
        (code, if text.trim().is_empty() { Value::Null } else { j(&text) })
    }

    /// Stop this process and start one armed with `crash`.
    fn restart(&mut self, crash: &str) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.spawn(crash);
    }

    /// Wait for the process to end (a failpoint's SIGKILL).
    fn died(&mut self) -> bool {
        let mut c = self.child.take().unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if let Some(st) = c.try_wait().unwrap() {
                let _ = c.wait();
                use std::os::unix::process::ExitStatusExt;
                return st.signal() == Some(libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    fn op_done(&self, id: &str, within: Duration) -> Value {
        let t = Instant::now();
        loop {
            let (code, op) = self.call("GET", &format!("/v1/operations/{id}"), Value::Null);
            assert_eq!(code, 200, "{op}");
            if op["status"] != "running" {
                return op;
            }
            assert!(t.elapsed() < within, "operation {id} still running: {op}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

const WRITES: u64 = 300_000;

fn blk_def(h: &Host, name: &str, writes: u64) -> (Value, PathBuf) {
    let disk = h.dir.join(format!("{name}.img"));
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let def = json!({
        "kernel": h.kernel, "memory": 64, "vcpus": 1,
        "cmdline": format!("staunch.work=blk-verify staunch.writes={writes} staunch.blocks={} staunch.qd=4 staunch.report=500", hosthelp::BLOCKS),
        "disk": [{"path": disk}],
    });
    (def, disk)
}

/// Create, pause and resume, snapshot then stop, restore, delete: each
/// through the API, each checked against the supervisor's view and the
/// guest's own reports.
#[test]
fn kvm_api_drives_a_vm_through_its_life() {
    require_kvm();
    let h = Host::start("api-life", "");
    let api = Api::start(&h, "");
    let (def, disk) = blk_def(&h, "a", WRITES);

    let body = json!({"name": "a", "definition": def}).to_string();
    let (code, text) = http(&api.sock, "POST", "/v1/vms", &[("Idempotency-Key", "create-a")], body.as_bytes());
    assert_eq!(code, 202, "{text}");
    let op = j(&text);
    // A retry with the same key is the same operation, not a second VM.
    let (code2, text2) = http(&api.sock, "POST", "/v1/vms", &[("Idempotency-Key", "create-a")], body.as_bytes());
    assert!(code2 == 202 || code2 == 200, "{text2}");
    assert_eq!(j(&text2)["id"], op["id"]);
    // Without the key, a second create of the same name is a conflict.
    let (code3, e) = api.call("POST", "/v1/vms", json!({"name": "a", "definition": def}));
    assert_eq!(code3, 409, "{e}");
    let done = api.op_done(op["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, vm) = api.call("GET", "/v1/vms/a", Value::Null);
    assert_eq!(vm["state"], "running", "{vm}");
    assert_eq!(vm["definition"]["disk"][0]["path"], json!(disk), "{vm}");
    h.progress("a");

    let (c, r) = api.call("POST", "/v1/vms/a/pause", Value::Null);
    assert_eq!(c, 200, "{r}");
    let (c, r) = api.call("POST", "/v1/vms/a/resume", Value::Null);
    assert_eq!(c, 200, "{r}");
    h.progress("a");

    assert!(!h.serial("a").contains("final=1"), "the guest is still at work when it is saved");
    let (c, op) = api.call("POST", "/v1/vms/a/snapshot", json!({"path": "s1"}));
    assert_eq!(c, 202, "{op}");
    let done = api.op_done(op["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    let snap = h.run.join("snapshots/a/s1");
    assert!(snap.is_file() && !h.run.join("snapshots/a/s1.partial").exists());
    let (_, vm) = api.call("GET", "/v1/vms/a", Value::Null);
    assert_eq!(vm["desired"], "stopped", "{vm}");
    h.wait("the snapshotted VM stopped", Duration::from_secs(30), |h| h.vm_state("a") == "stopped");
    // A stopped VM has no VMM to pause: 409, nothing changes.
    let (c, e) = api.call("POST", "/v1/vms/a/pause", Value::Null);
    assert_eq!((c, e["code"].as_str()), (409, Some("wrong-state")), "{e}");

    let reports = h.reports("a");
    let (c, op) = api.call("POST", "/v1/vms/a/restore", json!({"path": "s1"}));
    assert_eq!(c, 202, "{op}");
    let done = api.op_done(op["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    let (_, vm) = api.call("GET", "/v1/vms/a", Value::Null);
    assert_eq!(vm["state"], "running", "{vm}");
    assert!(vm["definition"]["restore"].is_null(), "the restore is cleared once done: {vm}");
    h.wait("the restored guest's reports", Duration::from_secs(90), |h| h.reports("a") > reports);
    h.wait("the restored guest's final report", Duration::from_secs(300), |h| h.serial("a").contains("final=1"));
    let log = h.serial("a");
    let last = log.lines().rfind(|l| l.contains("final=1")).unwrap();
    for (k, v) in [("written", WRITES), ("verified", WRITES), ("mismatches", 0), ("errors", 0)] {
        assert_eq!(common::field(last, k), v, "{last}");
    }
    common::check_disk(&disk, WRITES, hosthelp::BLOCKS);

    let (c, op) = api.call("DELETE", "/v1/vms/a", Value::Null);
    assert_eq!(c, 202, "{op}");
    let done = api.op_done(op["id"].as_str().unwrap(), Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{done}");
    let (c, _) = api.call("GET", "/v1/vms/a", Value::Null);
    assert_eq!(c, 404);
    assert!(!h.run.join("vm/a").exists(), "the VM's run directory is cleaned up");
    let st = h.status();
    assert!(!st.to_string().contains("vm/a/"), "no component of the deleted VM is left: {st}");
    let (_, m) = http(&api.sock, "GET", "/metrics", &[], b"");
    assert!(m.contains("staunch_component_up{component=\"store\""), "{m}");
    let (c, ev) = http(&api.sock, "GET", "/v1/events", &[], b"");
    assert_eq!(c, 200);
    assert!(ev.contains("event: operation-finished"), "{ev}");
}

/// Start an operation with the API armed to SIGKILL itself at `point`,
/// start a clean API, and return the operation once it ended.
fn crash_op(h: &Host, api: &mut Api, point: &str, method: &str, path: &str, body: Value) -> Value {
    api.restart(point);
    let b = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    let (code, text) = http(&api.sock, method, path, &[], &b);
    assert_eq!(code, 202, "{point}: {text}");
    let id = j(&text)["id"].as_str().unwrap().to_string();
    assert!(api.died(), "{point}: the failpoint killed the API");
    api.spawn("");
    let done = api.op_done(&id, Duration::from_secs(120));
    assert_eq!(done["status"], "succeeded", "{point}: {done}");
    let resumed =
        h.events().iter().filter(|e| e["event"] == "operation-resumed" && e["operation"] == id.as_str()).count();
    assert_eq!(resumed, 1, "{point}: resumed once");
    done
}

/// A SIGKILL of the API inside and between the phases of create,
/// snapshot, restore and delete: the next API process resumes each
/// operation once, and the host ends with exactly what the API says.
#[test]
fn kvm_api_resumes_an_operation_after_its_crash() {
    require_kvm();
    let h = Host::start("api-crash", "");
    let mut api = Api::start(&h, "");
    for (i, point) in ["create.define.done", "create.wait-running"].iter().enumerate() {
        let name = format!("c{i}");
        let (def, _) = blk_def(&h, &name, WRITES);
        let done = crash_op(&h, &mut api, point, "POST", "/v1/vms", json!({"name": name, "definition": def}));
        let phases: Vec<&str> =
            done["history"].as_array().unwrap().iter().map(|m| m["phase"].as_str().unwrap()).collect();
        assert!(phases.contains(&"wait-running"), "{phases:?}");
        let (_, vms) = api.call("GET", "/v1/vms", Value::Null);
        assert_eq!(vms["vms"].as_array().unwrap().iter().filter(|v| v["name"] == name.as_str()).count(), 1);
        assert_eq!(h.vm_state(&name), "running");
    }
    h.progress("c0");
    // Killed after the VMM saved (the file is whole) and before the phase
    // was recorded: the next process sees the file and does not save again.
    crash_op(&h, &mut api, "snapshot.save.done", "POST", "/v1/vms/c0/snapshot", json!({"path": "s"}));
    assert!(h.run.join("snapshots/c0/s").is_file());
    let saved = staunch_events::read(&h.run.join("vm/c0/vmm-events.jsonl"));
    assert_eq!(saved.iter().filter(|e| e["event"] == "snapshot").count(), 1, "saved once, not again on resumption");
    h.wait("c0 stopped", Duration::from_secs(30), |h| h.vm_state("c0") == "stopped");
    let reports = h.reports("c0");
    crash_op(&h, &mut api, "restore.wait-running", "POST", "/v1/vms/c0/restore", json!({"path": "s"}));
    h.wait("the restored guest's reports", Duration::from_secs(90), |h| h.reports("c0") > reports);
    crash_op(&h, &mut api, "delete.undefine", "DELETE", "/v1/vms/c1", Value::Null);
    crash_op(&h, &mut api, "delete.wait-gone", "DELETE", "/v1/vms/c0", Value::Null);
    let (_, vms) = api.call("GET", "/v1/vms", Value::Null);
    assert_eq!(vms["vms"], json!([]), "both VMs are gone");
    h.wait("no component of c0 or c1", Duration::from_secs(30), |h| !h.status().to_string().contains("vm/c"));
    let (_, ops) = api.call("GET", "/v1/operations", Value::Null);
    assert!(ops["operations"].as_array().unwrap().iter().all(|o| o["status"] == "succeeded"), "{ops}");
}

/// Bad input: a JSON error with a stable code and no change to the host.
#[test]
fn api_refuses_bad_input() {
    let h = Host::start("api-bad", "");
    let api = Api::start(&h, "");
    let kernel = h.kernel.display().to_string();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("POST", "/v1/vms", b"{not json".to_vec(), 400, "bad-request"),
        ("POST", "/v1/vms", br#"{"name":"x","definition":{"kernel":"/k"},"extra":1}"#.to_vec(), 400, "bad-request"),
        (
            "POST",
            "/v1/vms",
            br#"{"name":"x","definition":{"kernel":"/k","vcpus":"lots"}}"#.to_vec(),
            400,
            "bad-request",
        ),
        (
            "POST",
            "/v1/vms",
            format!(r#"{{"name":"x","definition":{{"kernel":"{kernel}","disk":[{{"path":"/nope.img"}}]}}}}"#)
                .into_bytes(),
            400,
            "invalid-definition",
        ),
        (
            "POST",
            "/v1/vms",
            format!(r#"{{"name":"../x","definition":{{"kernel":"{kernel}"}}}}"#).into_bytes(),
            400,
            "invalid-definition",
        ),
        ("POST", "/v1/vms", vec![b' '; 100 * 1024], 413, "too-large"),
        ("GET", "/v1/vms/nope", vec![], 404, "not-found"),
        ("POST", "/v1/vms/nope/pause", vec![], 404, "not-found"),
        ("POST", "/v1/vms/nope/snapshot", br#"{"path":"../../etc/x"}"#.to_vec(), 400, "bad-request"),
        ("DELETE", "/v1/vms/nope", vec![], 404, "not-found"),
        ("GET", "/v1/nothing", vec![], 404, "not-found"),
        ("PUT", "/v1/vms", vec![], 405, "method-not-allowed"),
        ("GET", "/v1/events?cursor=abc", vec![], 400, "bad-request"),
        ("GET", "/v1/operations/op-999999", vec![], 404, "not-found"),
        ("POST", "/v1/host/upgrade", br#"{"binary":"relative/staunch"}"#.to_vec(), 400, "bad-request"),
    ];
    for (m, p, b, want, code) in cases {
        let (got, text) = http(&api.sock, m, p, &[], &b);
        assert_eq!(got, want, "{m} {p}: {text}");
        assert_eq!(j(&text)["code"], code, "{m} {p}: {text}");
    }
    let (_, vms) = api.call("GET", "/v1/vms", Value::Null);
    assert_eq!(vms["vms"], json!([]), "nothing was created");
    let (_, ops) = api.call("GET", "/v1/operations", Value::Null);
    assert_eq!(ops["operations"], json!([]), "no operation was started");
}
