//! A full consistency check of the state machine, for tests, the simulator
//! and the fuzzers. It walks everything, so it is never called in service.

use super::{Core, Enqueued, NIL};

impl Core {
    /// Checks every structural invariant; `Err` says which one broke.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut expected_timers = usize::from(self.gc_timer.is_some());
        if self.keys.len() != self.resources.len() {
            return Err(format!(
                "{} keys but {} resources",
                self.keys.len(),
                self.resources.len()
            ));
        }
        let mut idle_count = 0;
        // Two-phase entries per resource, counted in one pass.
        let mut pin_counts: hashbrown::HashMap<u32, usize> = hashbrown::HashMap::new();
        for tp in self.conns.values().flat_map(|c| c.two_phase.iter()) {
            *pin_counts.entry(tp.res).or_default() += 1;
        }
        for (idx, r) in self.resources.iter() {
            let res = idx as u32;
            if self.keys.get(&r.key) != Some(&res) {
                return Err(format!("key {:?} does not map to its resource", r.key));
            }
            if r.holders.len() as u64 > r.limit {
                return Err(format!(
                    "{:?}: {} holders over limit {}",
                    r.key,
                    r.holders.len(),
                    r.limit
                ));
            }
            if (r.holders.len() as u64) < r.limit && !r.waiters.is_empty() {
                return Err(format!(
                    "{:?}: a free slot with {} waiters (lost wake-up)",
                    r.key,
                    r.waiters.len()
                ));
            }
            if r.idle != r.is_unused() {
                return Err(format!(
                    "{:?}: idle flag {} but unused {}",
                    r.key,
                    r.idle,
                    r.is_unused()
                ));
            }
            idle_count += usize::from(r.idle);
            let pins = pin_counts.get(&res).copied().unwrap_or(0);
            if pins != r.pins as usize {
                return Err(format!(
                    "{:?}: {} pins but {pins} two-phase entries",
                    r.key, r.pins
                ));
            }
            for (i, h) in r.holders.iter().enumerate() {
                if self.holder_at.get(&h.token) != Some(&(res, i as u32)) {
                    return Err(format!("{:?}: holder index out of step", r.key));
                }
                if !self.timers.is_scheduled(h.timer) {
                    return Err(format!("{:?}: holder without a lease timer", r.key));
                }
                if h.timer_at > h.expires_at {
                    return Err(format!("{:?}: lease timer later than the expiry", r.key));
                }
                expected_timers += 1;
                if let Some(c) = self.conns.get(&h.conn) {
                    if !c.holdings.contains(&h.token) {
                        return Err(format!(
                            "{:?}: holder missing from its connection's index",
                            r.key
                        ));
                    }
                } else if self.cfg.auto_release_on_disconnect {
                    return Err(format!("{:?}: holder of a gone connection", r.key));
                }
            }
            for w in &r.waiters {
                let Some(c) = self.conns.get(&w.conn) else {
                    return Err(format!("{:?}: waiter of a gone connection", r.key));
                };
                let blocked_here = c.blocked == Some((res, w.id));
                if w.timer.is_some() != blocked_here {
                    return Err(format!(
                        "{:?}: waiter timer and connection block disagree",
                        r.key
                    ));
                }
                if let Some(t) = w.timer {
                    if !self.timers.is_scheduled(t) {
                        return Err(format!("{:?}: blocked waiter without a timer", r.key));
                    }
                    expected_timers += 1;
                }
                let queued = c
                    .two_phase
                    .iter()
                    .any(|tp| tp.res == res && tp.state == Enqueued::Queued(w.id));
                if w.two_phase != queued {
                    return Err(format!(
                        "{:?}: two-phase waiter and its entry disagree",
                        r.key
                    ));
                }
            }
        }
        // The idle list holds exactly the idle resources, oldest first.
        let (mut n, mut cur, mut prev, mut last_since) = (0, self.idle_head, NIL, 0);
        while cur != NIL {
            let r = self
                .resources
                .get(cur as usize)
                .ok_or("idle list names a removed resource")?;
            if !r.idle || r.idle_prev != prev || r.idle_since < last_since {
                return Err(format!("idle list broken at {:?}", r.key));
            }
            last_since = r.idle_since;
            prev = cur;
            cur = r.idle_next;
            n += 1;
        }
        if n != idle_count || prev != self.idle_tail {
            return Err(format!(
                "idle list has {n} entries, {idle_count} idle resources"
            ));
        }
        if idle_count > 0 && self.gc_timer.is_none() {
            return Err("idle keys but no GC timer".into());
        }
        for (id, c) in &self.conns {
            for token in &c.holdings {
                let held = self.holder_at.get(token).is_some_and(|&(res, i)| {
                    self.resources
                        .get(res as usize)
                        .and_then(|r| r.holders.get(i as usize))
                        .is_some_and(|h| h.token == *token && h.conn == *id)
                });
                if !held {
                    return Err(format!(
                        "conn {id}: index names a holding that does not exist"
                    ));
                }
            }
            if let Some((res, w)) = c.blocked {
                let ok = self
                    .resources
                    .get(res as usize)
                    .is_some_and(|r| r.waiter(w).is_some());
                if !ok {
                    return Err(format!(
                        "conn {id}: blocked on a waiter that does not exist"
                    ));
                }
            }
            for (i, tp) in c.two_phase.iter().enumerate() {
                if c.two_phase[..i].iter().any(|o| o.res == tp.res) {
                    return Err(format!("conn {id}: two two-phase entries for one key"));
                }
                let r = self
                    .resources
                    .get(tp.res as usize)
                    .ok_or("two-phase entry for a removed key")?;
                if let Enqueued::Queued(w) = tp.state {
                    if r.waiter(w).is_none() {
                        return Err(format!(
                            "conn {id}: queued two-phase entry without its waiter"
                        ));
                    }
                }
            }
        }
        let held: usize = self.resources.iter().map(|(_, r)| r.holders.len()).sum();
        let waiting: usize = self.resources.iter().map(|(_, r)| r.waiters.len()).sum();
        if (held, waiting) != (self.held, self.waiting) {
            return Err(format!(
                "counted {} holders and {} waiters, found {held} and {waiting}",
                self.held, self.waiting
            ));
        }
        if self.holder_at.len() != held {
            return Err(format!(
                "{} holder index entries for {held} holders",
                self.holder_at.len()
            ));
        }
        if self.timers.len() != expected_timers {
            return Err(format!(
                "{} timers scheduled, {} live objects need one",
                self.timers.len(),
                expected_timers
            ));
        }
        Ok(())
    }
}
