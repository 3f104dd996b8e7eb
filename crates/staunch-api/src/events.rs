//! `GET /v1/events`: the host's events (`<run_dir>/events.jsonl`, written
//! by the supervisor, the API and relayed components) as Server-Sent
//! Events. Each event's `id` is the byte offset just past it, so a client
//! that reconnects with `Last-Event-ID` (or `?cursor=`) misses nothing and
//! sees nothing twice. `follow=true` keeps the stream open for new events.

use crate::error::{ApiError, Result};
use crate::routes::App;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use std::io::{Read, Seek, SeekFrom};
use std::time::Duration;

/// At most this much of the file per read (a stream of a huge file goes
/// out in pieces, not all in memory).
const CHUNK: u64 = 256 * 1024;

struct Query {
    cursor: u64,
    follow: bool,
}

fn query(raw: Option<&str>, h: &HeaderMap) -> Result<Query> {
    let mut q = Query { cursor: 0, follow: false };
    for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "cursor" => q.cursor = v.parse().map_err(|_| ApiError::bad(format!("cursor: '{v}' is not a number")))?,
            "follow" => {
                q.follow = match v {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(ApiError::bad(format!("follow: '{v}' is not true or false"))),
                }
            }
            _ => return Err(ApiError::bad(format!("unknown query parameter '{k}'"))),
        }
    }
    if let Some(id) = h.get("last-event-id") {
        let id = id.to_str().ok().and_then(|s| s.trim().parse().ok());
        q.cursor = id.ok_or_else(|| ApiError::bad("Last-Event-ID: not a cursor"))?;
    }
    Ok(q)
}

/// The complete lines from `cursor` (up to [`CHUNK`]), as SSE frames, and
/// the cursor past them.
fn read_from(path: &std::path::Path, cursor: u64) -> std::io::Result<(String, u64)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((String::new(), cursor)),
        Err(e) => return Err(e),
    };
    f.seek(SeekFrom::Start(cursor))?;
    let mut buf = Vec::new();
    f.take(CHUNK).read_to_end(&mut buf)?;
    let mut out = String::new();
    let mut at = cursor;
    let mut rest = &buf[..];
    // Only whole lines: a line being written is sent once it is complete.
    while let Some(nl) = rest.iter().position(|b| *b == b'\n') {
        let line = String::from_utf8_lossy(&rest[..nl]);
        at += nl as u64 + 1;
        rest = &rest[nl + 1..];
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
        let name = v["event"].as_str().unwrap_or("event").replace(['\n', '\r'], "");
        out.push_str(&format!("id: {at}\nevent: {name}\ndata: {v}\n\n"));
    }
    Ok((out, at))
}

fn on_boundary(path: &std::path::Path, cursor: u64) -> Result<()> {
    if cursor == 0 {
        return Ok(());
    }
    let mut f = std::fs::File::open(path).map_err(|_| ApiError::bad("cursor: there are no events yet"))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if cursor > len {
        return Err(ApiError::bad(format!("cursor: {cursor} is past the end of the events ({len})")));
    }
    let mut b = [0u8];
    f.seek(SeekFrom::Start(cursor - 1))
        .and_then(|_| f.read_exact(&mut b))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if b[0] != b'\n' {
        return Err(ApiError::bad(format!("cursor: {cursor} is not an event boundary")));
    }
    Ok(())
}

pub async fn stream(State(app): State<App>, RawQuery(raw): RawQuery, h: HeaderMap) -> Result<Response> {
    let q = query(raw.as_deref(), &h)?;
    let path = app.cfg.events();
    on_boundary(&path, q.cursor)?;
    let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut cursor = q.cursor;
        let mut idle = 0u32;
        loop {
            let p = path.clone();
            let r = tokio::task::spawn_blocking(move || read_from(&p, cursor)).await;
            let (text, next) = match r {
                Ok(Ok(v)) => v,
                _ => return,
            };
            let more = next != cursor;
            cursor = next;
            if !text.is_empty() && tx.send(Ok(Bytes::from(text))).await.is_err() {
                return;
            }
            if !more {
                if !q.follow {
                    return;
                }
                // A comment every 5 s when idle, so a client sees the stream
                // is live and a client that went away is noticed.
                idle += 1;
                if idle.is_multiple_of(100) && tx.send(Ok(Bytes::from_static(b": idle\n\n"))).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = tx.closed() => return,
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/event-stream"), (axum::http::header::CACHE_CONTROL, "no-cache")],
        body,
    )
        .into_response())
}
