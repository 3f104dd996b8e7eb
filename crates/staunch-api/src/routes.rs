//! The routes: one table, which is both what the router serves and what
//! the conformance test compares with the OpenAPI spec. Request bodies are
//! parsed here (not by axum's extractors) so every rejection is a JSON
//! error with a stable code.

use crate::error::{ApiError, Result};
use crate::extract::{Body, Param};
use crate::journal::{self, Created, NewOp, OpKind};
use crate::runner::{self, Ctx};
use crate::{phases, view};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use staunch_host::def::{Desired, VM_ROOT, VmDef};
use staunch_host::storeio;
use std::path::{Component, PathBuf};
use std::sync::Arc;

pub type App = Arc<Ctx>;

/// The OpenAPI document, served at `/openapi.json`.
pub const SPEC: &str = include_str!("../../../docs/api/openapi.json");

/// Every route: method, path (OpenAPI's template syntax, which is also
/// axum's), handler.
pub fn table() -> Vec<(&'static str, &'static str, MethodRouter<App>)> {
    vec![
        ("GET", "/openapi.json", get(spec)),
        ("GET", "/v1/ping", get(ping)),
        ("GET", "/v1/vms", get(list_vms)),
        ("POST", "/v1/vms", post(create_vm)),
        ("GET", "/v1/vms/{name}", get(get_vm)),
        ("DELETE", "/v1/vms/{name}", delete(delete_vm)),
        ("GET", "/v1/vms/{name}/disks", get(disks)),
        ("GET", "/v1/vms/{name}/nics", get(nics)),
        ("POST", "/v1/vms/{name}/start", post(start)),
        ("POST", "/v1/vms/{name}/stop", post(stop)),
        ("POST", "/v1/vms/{name}/pause", post(pause)),
        ("POST", "/v1/vms/{name}/resume", post(resume)),
        ("POST", "/v1/vms/{name}/reboot", post(reboot)),
        ("POST", "/v1/vms/{name}/upgrade", post(upgrade)),
        ("POST", "/v1/vms/{name}/snapshot", post(snapshot)),
        ("POST", "/v1/vms/{name}/restore", post(restore)),
        ("GET", "/v1/host/components", get(components)),
        ("GET", "/v1/host/upgrade", get(host_upgrade_state)),
        ("POST", "/v1/host/upgrade", post(host_upgrade)),
        ("GET", "/v1/operations", get(list_ops)),
        ("GET", "/v1/operations/{id}", get(get_op)),
        ("GET", "/v1/events", get(crate::events::stream)),
        ("GET", "/metrics", get(metrics)),
    ]
}

pub fn router(app: App) -> Router {
    let mut r = Router::new();
    for (_, path, m) in table() {
        r = r.route(path, m);
    }
    r.fallback(|| async { ApiError::not_found("no such resource") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this resource does not take that method",
            )
        })
        .with_state(app)
}

/// A JSON body of type `T`; an empty body is `{}`.
fn body<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    let b: &[u8] = if b.iter().all(u8::is_ascii_whitespace) { b"{}" } else { b };
    serde_json::from_slice(b).map_err(|e| ApiError::bad(format!("request body: {e}")))
}

fn idempotency_key(h: &HeaderMap) -> Result<Option<String>> {
    let Some(v) = h.get("idempotency-key") else { return Ok(None) };
    let v = v.to_str().map_err(|_| ApiError::bad("Idempotency-Key: not ASCII"))?;
    let ok = !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(ApiError::bad("Idempotency-Key: 1 to 64 of A-Z, a-z, 0-9, '-', '_'"));
    }
    Ok(Some(v.to_string()))
}

fn json_ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

async fn spec() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], SPEC).into_response()
}

async fn ping(State(app): State<App>) -> Response {
    json_ok(json!({"pid": std::process::id(), "version": env!("CARGO_PKG_VERSION"), "run_dir": app.cfg.run_dir}))
}

async fn list_vms(State(app): State<App>) -> Result<Response> {
    let a = app.clone();
    Ok(json_ok(app.store.run(move |c| view::vms(c, &a.cfg)).await?))
}

async fn get_vm(State(app): State<App>, Param(name): Param) -> Result<Response> {
    let a = app.clone();
    Ok(json_ok(app.store.run(move |c| view::vm(c, &a.cfg, &name)).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateVm {
    name: String,
    definition: VmDef,
    #[serde(default)]
    timeout_s: Option<u64>,
}

/// Start an operation (or find the one its key started) and answer 202
/// with it (200 for a retry of a finished one).
async fn start_op(
    app: &App,
    n: NewOp,
    check: impl Fn(&mut staunch_store::client::Client, u32) -> Result<()> + Send + 'static,
) -> Result<Response> {
    let created = app.store.run(move |c| journal::create(c, &n, check)).await?;
    let (op, code) = match created {
        Created::New(op) => {
            app.emit("operation-started", json!({"operation": op.id, "kind": op.kind.name(), "vm": op.vm}));
            (op, StatusCode::ACCEPTED)
        }
        Created::Existing(op) if op.finished() => (op, StatusCode::OK),
        Created::Existing(op) => (op, StatusCode::ACCEPTED),
    };
    runner::spawn(app, &op.id);
    let loc = format!("/v1/operations/{}", op.id);
    Ok((code, [(axum::http::header::LOCATION, loc)], axum::Json(op_json(&op))).into_response())
}

pub fn op_json(op: &journal::Op) -> Value {
    let mut v = serde_json::to_value(op).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        // Internal: which process drives it, and the request's hash.
        m.remove("owner");
        m.remove("request_hash");
        m.remove("version");
    }
    v
}

fn defined_in(c: &mut staunch_store::client::Client, tx: u32, name: &str) -> Result<bool> {
    use staunch_store::client::nul;
    match c.request(staunch_store::wire::Op::Directory, tx, &nul(&[&format!("{VM_ROOT}/{name}")])) {
        Ok(Ok(b)) => Ok(b.iter().any(|x| *x != 0)),
        Ok(Err(e)) if e == "ENOENT" => Ok(false),
        Ok(Err(e)) => Err(ApiError::store(format!("{VM_ROOT}/{name}: {e}"))),
        Err(e) => Err(ApiError::store(format!("{VM_ROOT}/{name}: {e}"))),
    }
}

async fn create_vm(State(app): State<App>, h: HeaderMap, Body(b): Body) -> Result<Response> {
    let key = idempotency_key(&h)?;
    let req: CreateVm = body(&b)?;
    staunch_host::def::check_name(&req.name).map_err(|e| ApiError::invalid(e.to_string()))?;
    if req.definition.restore.is_some() {
        return Err(ApiError::invalid("definition.restore: a VM is restored with POST /v1/vms/{name}/restore"));
    }
    req.definition.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    let mut def = req.definition.clone();
    def.state = Desired::Running;
    let params = json!({"definition": def, "timeout_s": req.timeout_s});
    let name = req.name.clone();
    let n = NewOp {
        kind: OpKind::Create,
        vm: Some(req.name),
        key,
        request_hash: journal::hash(&b),
        params,
        first_phase: phases::first(OpKind::Create),
    };
    start_op(&app, n, move |c, tx| {
        if defined_in(c, tx, &name)? {
            return Err(ApiError::conflict(format!("a VM named '{name}' is defined already")));
        }
        Ok(())
    })
    .await
}

fn must_exist(name: String) -> impl Fn(&mut staunch_store::client::Client, u32) -> Result<()> + Send + 'static {
    move |c, tx| {
        if defined_in(c, tx, &name)? { Ok(()) } else { Err(ApiError::not_found(format!("no VM named '{name}'"))) }
    }
}

async fn delete_vm(State(app): State<App>, h: HeaderMap, Param(name): Param) -> Result<Response> {
    let key = idempotency_key(&h)?;
    check_vm_name(&name)?;
    let n = NewOp {
        kind: OpKind::Delete,
        vm: Some(name.clone()),
        key,
        request_hash: journal::hash(name.as_bytes()),
        params: json!({}),
        first_phase: phases::first(OpKind::Delete),
    };
    start_op(&app, n, must_exist(name)).await
}

fn check_vm_name(name: &str) -> Result<()> {
    staunch_host::def::check_name(name).map_err(|_| ApiError::not_found(format!("no VM named '{name}'")))
}

/// The VM's definition, 404 if none; 409 if an operation holds it.
fn definition(c: &mut staunch_store::client::Client, name: &str, free: bool) -> Result<VmDef> {
    check_vm_name(name)?;
    let keys = storeio::subtree(c, &format!("{VM_ROOT}/{name}"))?;
    if keys.is_empty() {
        return Err(ApiError::not_found(format!("no VM named '{name}'")));
    }
    if free && let Some(op) = journal::holder(c, name)? {
        return Err(ApiError::busy(name, &op.id));
    }
    VmDef::from_keys(&keys).map_err(|e| ApiError::wrong_state(format!("VM '{name}' is not defined correctly: {e}")))
}

async fn disks(State(app): State<App>, Param(name): Param) -> Result<Response> {
    let d = app.store.run(move |c| definition(c, &name, false)).await?;
    let v: Vec<Value> =
        d.disk.iter().enumerate().map(|(i, k)| json!({"index": i, "path": k.path, "readonly": k.readonly})).collect();
    Ok(json_ok(json!({"disks": v})))
}

async fn nics(State(app): State<App>, Param(name): Param) -> Result<Response> {
    let d = app.store.run(move |c| definition(c, &name, false)).await?;
    let v: Vec<Value> = d
        .nic
        .iter()
        .enumerate()
        .map(|(i, n)| json!({"index": i, "tap": n.tap, "mac": n.mac, "netns": n.netns}))
        .collect();
    Ok(json_ok(json!({"nics": v})))
}

async fn set_desired(app: App, name: String, want: Desired) -> Result<Response> {
    let a = app.clone();
    let v = app
        .store
        .run(move |c| {
            definition(c, &name, true)?;
            storeio::set_desired(c, &name, want)?;
            view::vm(c, &a.cfg, &name)
        })
        .await?;
    Ok(json_ok(v))
}

async fn start(State(app): State<App>, Param(name): Param, Body(b): Body) -> Result<Response> {
    let _: Empty = body(&b)?;
    set_desired(app, name, Desired::Running).await
}

async fn stop(State(app): State<App>, Param(name): Param, Body(b): Body) -> Result<Response> {
    let _: Empty = body(&b)?;
    set_desired(app, name, Desired::Stopped).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

/// Send one request to the VM's VMM; the VM must be running and free.
async fn to_vmm(app: App, name: String, req: staunch_vmm::api::ApiRequest) -> Result<Response> {
    let a = app.clone();
    let action = serde_json::to_value(&req).ok().and_then(|v| v["cmd"].as_str().map(String::from)).unwrap_or_default();
    let n = name.clone();
    app.store
        .run(move |c| {
            definition(c, &n, true)?;
            match phases::vm_state(c, &n)?.as_deref() {
                Some("running" | "running-with-error") => Ok(()),
                s => Err(ApiError::wrong_state(format!("VM '{n}' is {}, not running", s.unwrap_or("unknown")))),
            }
        })
        .await?;
    let sock = staunch_host::component::VmPaths::new(&a.cfg, &name).api();
    let r = tokio::task::spawn_blocking(move || staunch_vmm::api::request(&sock, &req))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::vmm(format!("VM '{name}': its VMM did not answer: {e}")))?;
    if !r.ok {
        return Err(ApiError::wrong_state(format!("VM '{name}': {}", r.error.unwrap_or_default())));
    }
    app.emit("vm-action", json!({"vm": name, "action": action}));
    Ok(json_ok(json!({"vm": name, "action": action, "vmm": r.data})))
}

async fn pause(State(app): State<App>, Param(name): Param, Body(b): Body) -> Result<Response> {
    let _: Empty = body(&b)?;
    to_vmm(app, name, staunch_vmm::api::ApiRequest::Pause {}).await
}

async fn resume(State(app): State<App>, Param(name): Param, Body(b): Body) -> Result<Response> {
    let _: Empty = body(&b)?;
    to_vmm(app, name, staunch_vmm::api::ApiRequest::Resume {}).await
}

async fn reboot(State(app): State<App>, Param(name): Param, Body(b): Body) -> Result<Response> {
    let _: Empty = body(&b)?;
    to_vmm(app, name, staunch_vmm::api::ApiRequest::Reboot {}).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Binary {
    #[serde(default)]
    binary: Option<PathBuf>,
}

fn check_binary(b: &std::path::Path) -> Result<()> {
    if !b.is_absolute() || !b.is_file() {
        return Err(ApiError::bad(format!("binary: {} is not an absolute path to a file", b.display())));
    }
    Ok(())
}

async fn upgrade(State(app): State<App>, Param(name): Param, Body(b): Body) -> Result<Response> {
    let req: Binary = body(&b)?;
    if let Some(b) = &req.binary {
        check_binary(b)?;
    }
    to_vmm(app, name, staunch_vmm::api::ApiRequest::Upgrade { binary: req.binary }).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotReq {
    path: String,
}

/// A snapshot file of VM `name`: inside its own snapshot directory
/// (`<run_dir>/snapshots/<name>/`), given relative to it or absolute. A
/// `..`, a link out of it, or a name the VMM uses for itself is refused.
pub fn snapshot_path(cfg: &staunch_host::HostConfig, name: &str, given: &str) -> Result<PathBuf> {
    let dir = cfg.run_dir.join("snapshots").join(name);
    let bad = |why: &str| ApiError::bad(format!("path '{given}': {why}"));
    if given.is_empty() || given.len() > 255 || given.contains('\0') {
        return Err(bad("must be 1 to 255 bytes, no NUL"));
    }
    let p = std::path::Path::new(given);
    let rel = if p.is_absolute() {
        p.strip_prefix(&dir).map_err(|_| bad(&format!("must be inside {}", dir.display())))?
    } else {
        p
    };
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) || rel.components().count() != 1 {
        return Err(bad("must name a file directly in the VM's snapshot directory (no '..', no subdirectory)"));
    }
    if given.ends_with(".partial") {
        return Err(bad("'.partial' files are snapshots being written"));
    }
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::internal(format!("{}: {e}", dir.display())))?;
    let full = dir.join(rel);
    if std::fs::symlink_metadata(&full).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(bad("is a symbolic link"));
    }
    Ok(full)
}

async fn snapshot(State(app): State<App>, h: HeaderMap, Param(name): Param, Body(b): Body) -> Result<Response> {
    let key = idempotency_key(&h)?;
    let req: SnapshotReq = body(&b)?;
    check_vm_name(&name)?;
    let path = snapshot_path(&app.cfg, &name, &req.path)?;
    let n = NewOp {
        kind: OpKind::Snapshot,
        vm: Some(name.clone()),
        key,
        request_hash: journal::hash(&[name.as_bytes(), &b].concat()),
        params: json!({"path": path}),
        first_phase: phases::first(OpKind::Snapshot),
    };
    let exists = path.exists();
    start_op(&app, n, move |c, tx| {
        must_exist(name.clone())(c, tx)?;
        if exists {
            return Err(ApiError::conflict(format!("{} exists: snapshots are never overwritten", path.display())));
        }
        match phases::vm_state(c, &name)?.as_deref() {
            Some("running") => Ok(()),
            s => Err(ApiError::wrong_state(format!("VM '{name}' is {}, not running", s.unwrap_or("unknown")))),
        }
    })
    .await
}

async fn restore(State(app): State<App>, h: HeaderMap, Param(name): Param, Body(b): Body) -> Result<Response> {
    let key = idempotency_key(&h)?;
    let req: SnapshotReq = body(&b)?;
    check_vm_name(&name)?;
    let path = snapshot_path(&app.cfg, &name, &req.path)?;
    if !path.is_file() {
        return Err(ApiError::bad(format!("path '{}': no such snapshot", req.path)));
    }
    let n = NewOp {
        kind: OpKind::Restore,
        vm: Some(name.clone()),
        key,
        request_hash: journal::hash(&[name.as_bytes(), &b].concat()),
        params: json!({"path": path}),
        first_phase: phases::first(OpKind::Restore),
    };
    start_op(&app, n, move |c, tx| {
        must_exist(name.clone())(c, tx)?;
        match phases::vm_state(c, &name)?.as_deref() {
            Some("stopped") => Ok(()),
            s => Err(ApiError::wrong_state(format!(
                "VM '{name}' is {}: restore needs it stopped",
                s.unwrap_or("unknown")
            ))),
        }
    })
    .await
}

async fn components(State(app): State<App>) -> Response {
    json_ok(view::components(&app.cfg))
}

async fn host_upgrade_state(State(app): State<App>) -> Result<Response> {
    use staunch_host::storeio::UPGRADE_ROOT;
    let (binary, generation) = app
        .store
        .run(|c| {
            let g = storeio::read(c, &format!("{UPGRADE_ROOT}/generation"))?.and_then(|g| g.trim().parse::<u64>().ok());
            Ok((storeio::read(c, &format!("{UPGRADE_ROOT}/binary"))?, g))
        })
        .await?;
    let comps = view::components(&app.cfg)["components"].clone();
    let at: Vec<Value> = comps
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| json!({"id": c["id"], "generation": c["generation"], "binary": c["binary"]}))
        .collect();
    let upgraded = at.iter().filter(|c| generation.is_some() && c["generation"].as_u64() == generation).count();
    Ok(json_ok(json!({"binary": binary, "generation": generation, "components": at, "upgraded": upgraded})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostUpgradeReq {
    binary: PathBuf,
}

async fn host_upgrade(State(app): State<App>, h: HeaderMap, Body(b): Body) -> Result<Response> {
    let key = idempotency_key(&h)?;
    let req: HostUpgradeReq = body(&b)?;
    check_binary(&req.binary)?;
    let n = NewOp {
        kind: OpKind::HostUpgrade,
        vm: None,
        key,
        request_hash: journal::hash(&b),
        params: json!({"binary": req.binary}),
        first_phase: phases::first(OpKind::HostUpgrade),
    };
    start_op(&app, n, |_, _| Ok(())).await
}

async fn list_ops(State(app): State<App>) -> Result<Response> {
    let ops = app.store.run(journal::list).await?;
    Ok(json_ok(json!({"operations": ops.iter().map(op_json).collect::<Vec<_>>()})))
}

async fn get_op(State(app): State<App>, Param(id): Param) -> Result<Response> {
    let ok = id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !ok {
        return Err(ApiError::not_found(format!("no operation '{id}'")));
    }
    let op = app
        .store
        .run(move |c| journal::get(c, &id)?.ok_or_else(|| ApiError::not_found(format!("no operation '{id}'"))))
        .await?;
    Ok(json_ok(op_json(&op)))
}

async fn metrics(State(app): State<App>) -> Result<Response> {
    let a = app.clone();
    let text = app.store.run(move |c| view::metrics(c, &a.cfg)).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec is the contract: every route it lists is served, and every
    /// served route is in it.
    #[test]
    fn spec_and_router_agree() {
        let spec: Value = serde_json::from_str(SPEC).expect("the spec is JSON");
        let mut in_spec: Vec<(String, String)> = Vec::new();
        for (path, ops) in spec["paths"].as_object().expect("paths") {
            for m in ops.as_object().expect("operations").keys() {
                in_spec.push((m.to_uppercase(), path.clone()));
            }
        }
        let mut served: Vec<(String, String)> =
            table().iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
        in_spec.sort();
        served.sort();
        assert_eq!(in_spec, served, "docs/api/openapi.json (scripts/api/gen_openapi.py) and routes::table() differ");
    }

    #[test]
    fn snapshot_paths_stay_in_the_vm_directory() {
        let dir = std::env::temp_dir().join(format!("staunch-api-snap-{}", std::process::id()));
        let cfg: staunch_host::HostConfig = toml_cfg(&dir).expect("a host config");
        let inside = dir.join("snapshots/web/a.snap");
        assert_eq!(snapshot_path(&cfg, "web", "a.snap").unwrap(), inside);
        assert_eq!(snapshot_path(&cfg, "web", inside.to_str().unwrap()).unwrap(), inside);
        for bad in ["../x", "/etc/passwd", "a/b", "..", "", "x.partial", "./a"] {
            let e = snapshot_path(&cfg, "web", bad).unwrap_err();
            assert_eq!(e.code, "bad-request", "{bad}: {e}");
        }
        let other = dir.join("snapshots/db/a.snap");
        assert!(snapshot_path(&cfg, "web", other.to_str().unwrap()).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn toml_cfg(dir: &std::path::Path) -> Option<staunch_host::HostConfig> {
        std::fs::create_dir_all(dir).ok()?;
        let f = dir.join("host.toml");
        std::fs::write(&f, format!("run_dir = \"{}\"\n", dir.display())).ok()?;
        staunch_host::HostConfig::from_file(&f).ok()
    }
}
