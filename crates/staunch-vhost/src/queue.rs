//! One queue worker: waits on the kick eventfd, serves chains, publishes
//! used entries and signals the call eventfd. Every request is recorded in
//! the inflight region from the moment it is taken from the avail ring
//! until its used entry is published, so a backend that dies anywhere in
//! between is resumed by its successor without losing or repeating a
//! completion the guest saw.
//!
//! Exactly once, as the guest sees it: a request that was completed on the
//! disk but not yet published is served again. For block that writes the
//! same bytes to the same sectors (idempotent); a read returns the same
//! data; a flush is repeated. Requests are resubmitted in submission order,
//! so a flush still follows the writes it was submitted after.

use crate::backend::QueueHandler;
use crate::chain;
use crate::inflight::{Recovery, Region};
use crate::memory::Memory;
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub(crate) struct WorkerSetup {
    pub index: usize,
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub base: u16,
    pub kick: File,
    pub call: Option<File>,
    pub mem: Memory,
    pub inflight: Option<Arc<Region>>,
    pub handler: Box<dyn QueueHandler>,
    pub events: Option<std::path::PathBuf>,
    pub component: &'static str,
}

pub(crate) struct Worker {
    stop: EventFd,
    thread: JoinHandle<u16>,
}

impl State {
    /// The worker's state over a configured ring: where to continue, from
    /// the inflight region if there is one (what it says to resubmit is
    /// returned too), else from the frontend's base.
    fn new(s: WorkerSetup) -> std::io::Result<(State, File, Option<Recovery>)> {
        let mut q = Queue::new(s.size).map_err(|e| std::io::Error::other(e.to_string()))?;
        q.set_desc_table_address(Some(s.desc.0 as u32), Some((s.desc.0 >> 32) as u32));
        q.set_avail_ring_address(Some(s.avail.0 as u32), Some((s.avail.0 >> 32) as u32));
        q.set_used_ring_address(Some(s.used.0 as u32), Some((s.used.0 >> 32) as u32));
        q.set_ready(true);
        let guest_used: u16 = s.mem.mem.read_obj(GuestAddress(s.used.0 + 2)).unwrap_or(0);
        let mut resubmit = VecDeque::new();
        let mut counter = 1;
        let rec = s.inflight.as_ref().and_then(|r| r.queue(s.index)).map(|qi| {
            let rec = qi.recover(u16::from_le(guest_used));
            counter = qi.next_counter();
            rec
        });
        match &rec {
            Some(r) => {
                q.set_next_used(r.next_used);
                q.set_next_avail(r.next_avail);
                resubmit.extend(r.resubmit.iter().copied());
            }
            None => {
                q.set_next_used(u16::from_le(guest_used));
                q.set_next_avail(s.base);
            }
        }
        let st = State {
            index: s.index,
            q,
            mem: s.mem,
            inflight: s.inflight,
            handler: s.handler,
            call: s.call.map(crate::backend::eventfd),
            resubmit,
            counter,
            events: s.events,
            component: s.component,
            busy: Arc::default(),
            starved: false,
        };
        Ok((st, s.kick, rec))
    }
}

/// Serve what the ring holds once, on this thread; the avail position
/// reached (for the fuzz targets and tests).
pub(crate) fn serve_once(s: WorkerSetup) -> std::io::Result<u16> {
    let (mut st, _, _) = State::new(s)?;
    st.pass();
    Ok(st.q.next_avail())
}

impl Worker {
    /// Start serving; returns what the inflight region said to resubmit.
    pub fn start(s: WorkerSetup) -> std::io::Result<(Worker, Option<Recovery>)> {
        let (mut st, kick, rec) = State::new(s)?;
        let index = st.index;
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let kick = crate::backend::eventfd(kick);
        let busy = Arc::new(crate::control::Busy::default());
        crate::control::watch(index, &busy);
        st.busy = busy.clone();
        let thread = std::thread::Builder::new().name(format!("vq{index}")).spawn(move || {
            // Serve once at start: requests may be waiting (resubmissions, or
            // kicks that went to a backend that died before reading them).
            busy.enter();
            st.pass();
            busy.leave();
            loop {
                // The source (a tap) only while a buffer waits for it: a
                // readable tap and an empty ring would spin.
                let source = st.starved.then(|| st.handler.source()).flatten();
                let mut fds = [
                    libc::pollfd { fd: kick.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: stop2.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: source.unwrap_or(-1), events: libc::POLLIN, revents: 0 },
                ];
                // SAFETY: three valid pollfd entries (a negative fd is ignored).
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
                if n < 0 {
                    continue;
                }
                if fds[1].revents != 0 {
                    break;
                }
                if fds[0].revents & !libc::POLLIN != 0 {
                    // Not an eventfd we can wait on: stop serving this queue.
                    break;
                }
                if fds[0].revents & libc::POLLIN != 0 {
                    let _ = kick.read();
                }
                if fds[0].revents != 0 || fds[2].revents != 0 {
                    busy.enter();
                    st.pass();
                    busy.leave();
                }
            }
            st.q.next_avail()
        })?;
        Ok((Worker { stop, thread }, rec))
    }

    /// Stop the worker; the position it reached in the avail ring.
    pub fn stop(self) -> u16 {
        let _ = self.stop.write(1);
        self.thread.join().unwrap_or(0)
    }
}

enum Stop {
    /// An injected error: the request is first in line again.
    Injected(&'static str),
    /// The ring itself is unusable (the guest broke it): wait for a kick.
    Ring(String),
}

struct State {
    index: usize,
    q: Queue,
    mem: Memory,
    inflight: Option<Arc<Region>>,
    handler: Box<dyn QueueHandler>,
    call: Option<EventFd>,
    resubmit: VecDeque<u16>,
    counter: u64,
    events: Option<std::path::PathBuf>,
    component: &'static str,
    /// Refreshed at every request: the watchdog sees one that never ends.
    busy: Arc<crate::control::Busy>,
    /// The last pass stopped because the handler was not ready (buffers
    /// wait for its source), not because the ring was empty.
    starved: bool,
}

impl State {
    /// Serve everything available, then signal once.
    fn pass(&mut self) {
        let mut used = false;
        loop {
            let r = {
                let _contained = staunch_fault::ContainedRegion::enter();
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve_one()))
            };
            match r {
                Ok(Ok(true)) => used = true,
                Ok(Ok(false)) => break,
                Ok(Err(Stop::Injected(e))) => {
                    // Retried at once: the request was put back first in line.
                    tracing::warn!(queue = self.index, error = e, "request will be served again");
                }
                Ok(Err(Stop::Ring(e))) => {
                    tracing::warn!(queue = self.index, error = %e, "queue pass stopped");
                    break;
                }
                Err(_) => {
                    // A panic in the device model: rebuild the queue's
                    // position from the inflight region and go on.
                    self.microreset();
                }
            }
        }
        if used && let Some(c) = &self.call {
            let _ = c.write(1);
        }
    }

    fn microreset(&mut self) {
        let t = std::time::Instant::now();
        let guest_used: u16 = self.mem.mem.read_obj(GuestAddress(self.q.used_ring() + 2)).unwrap_or(0);
        if let Some(qi) = self.inflight.as_ref().and_then(|r| r.queue(self.index)) {
            let rec = qi.recover(u16::from_le(guest_used));
            self.q.set_next_used(rec.next_used);
            self.q.set_next_avail(rec.next_avail);
            self.resubmit = rec.resubmit.into_iter().collect();
            self.counter = qi.next_counter();
        }
        staunch_events::emit(
            self.events.as_deref(),
            "microreset",
            serde_json::json!({"component": self.component, "queue": self.index, "rung": 1,
                               "fault": "panic in the device model", "resubmit": self.resubmit.len(),
                               "recovery_us": t.elapsed().as_secs_f64() * 1e6, "outcome": "recovered"}),
        );
    }

    /// Serve one request; Ok(false) when there is nothing to serve.
    fn serve_one(&mut self) -> Result<bool, Stop> {
        self.busy.enter();
        self.starved = false;
        let mem = &self.mem.mem;
        if !self.handler.ready() {
            // Nothing to put in a buffer yet; whether one waits is seen below.
            let avail = self.q.avail_idx(mem, Ordering::Acquire).map_err(|e| Stop::Ring(e.to_string()))?;
            self.starved = !self.resubmit.is_empty() || avail.0 != self.q.next_avail();
            return Ok(false);
        }
        let qi = self.inflight.as_ref().and_then(|r| r.queue(self.index));
        let head = match self.resubmit.pop_front() {
            Some(h) => h,
            None => {
                let avail = self.q.avail_idx(mem, Ordering::Acquire).map_err(|e| Stop::Ring(e.to_string()))?;
                let ahead = avail.0.wrapping_sub(self.q.next_avail());
                if ahead == 0 {
                    return Ok(false);
                }
                if ahead > self.q.size() {
                    return Err(Stop::Ring(format!(
                        "avail index {} ran more than a queue ahead of {}",
                        avail.0,
                        self.q.next_avail()
                    )));
                }
                let Some(chain) = self.q.pop_descriptor_chain(mem) else { return Ok(false) };
                let head = chain.head_index();
                if let Some(qi) = &qi {
                    qi.begin(head, self.counter);
                    self.counter += 1;
                }
                head
            }
        };
        if staunch_fault::hit(&staunch_fault::VHOST_REQUEST).is_err() {
            // An injected error: serve it again on the next pass.
            self.resubmit.push_front(head);
            return Err(Stop::Injected("before serving a request"));
        }
        let len = match chain::walk(mem, GuestAddress(self.q.desc_table()), self.q.size(), head) {
            Ok(descs) => self.handler.serve(&descs, mem),
            Err(e) => {
                tracing::warn!(queue = self.index, head, error = %e, "bad descriptor chain");
                0
            }
        };
        if staunch_fault::hit(&staunch_fault::VHOST_COMPLETED).is_err() {
            self.resubmit.push_front(head);
            return Err(Stop::Injected("after serving a request"));
        }
        if let Some(qi) = &qi {
            qi.pre_put(head);
        }
        self.q.add_used(mem, head, len).map_err(|e| Stop::Ring(e.to_string()))?;
        let _ = staunch_fault::hit(&staunch_fault::VHOST_INFLIGHT);
        if let Some(qi) = &qi {
            qi.post_put(head, self.q.next_used());
        }
        self.busy.completed();
        Ok(true)
    }
}
