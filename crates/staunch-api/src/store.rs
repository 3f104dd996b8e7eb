//! The config store as the API uses it: blocking connections (the store's
//! client is synchronous) kept in a small pool and used from tokio's
//! blocking threads, so a slow store never stalls the connections that do
//! not need it. A connection that failed is dropped, not pooled.

use crate::error::{ApiError, Result};
use staunch_store::client::Client;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const POOLED: usize = 8;

#[derive(Clone)]
pub struct Store {
    socket: PathBuf,
    pool: Arc<Mutex<Vec<Client>>>,
}

impl Store {
    pub fn new(socket: PathBuf) -> Store {
        Store { socket, pool: Arc::default() }
    }

    /// A connection from the pool, or a new one.
    pub fn take(&self) -> Result<Client> {
        if let Some(c) = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok(c);
        }
        let mut c = Client::connect(&self.socket)
            .map_err(|e| ApiError::store(format!("config store {}: {e}", self.socket.display())))?;
        // Ride out a failover (the standby takes the socket over in ms);
        // beyond that the client gets a 503 rather than a hung request.
        c.reconnect_for = Duration::from_millis(1500);
        Ok(c)
    }

    pub fn give(&self, c: Client) {
        let mut p = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if p.len() < POOLED {
            p.push(c);
        }
    }

    /// Run `f` on a pooled connection, on the calling (blocking) thread.
    pub fn with<T>(&self, f: impl FnOnce(&mut Client) -> Result<T>) -> Result<T> {
        let mut c = self.take()?;
        let r = f(&mut c);
        // An unreachable store poisons the connection; anything else
        // (404, 409, a refused value) leaves it usable.
        if !matches!(&r, Err(e) if e.code == "store-unavailable") {
            self.give(c);
        }
        r
    }

    /// [`Store::with`] from async code, on tokio's blocking pool.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce(&mut Client) -> Result<T> + Send + 'static) -> Result<T> {
        let s = self.clone();
        tokio::task::spawn_blocking(move || s.with(f))
            .await
            .map_err(|e| ApiError::internal(format!("store task: {e}")))?
    }
}
