//! The `stats` reply as typed structs.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A server's state as `stats` reports it.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Open client connections.
    pub connections: u64,
    /// Held keys of limit 1.
    pub locks: Vec<LockStat>,
    /// Held or waited-on keys of a larger limit.
    pub semaphores: Vec<SemaphoreStat>,
    /// Locks nobody holds or waits for, not yet forgotten.
    pub idle_locks: Vec<IdleStat>,
    /// Semaphores nobody holds or waits for, not yet forgotten.
    pub idle_semaphores: Vec<IdleStat>,
    /// Subscriptions, by pattern and group.
    pub signal_channels: Vec<ChannelStat>,
    /// Cluster state, from a server in cluster mode.
    pub cluster: Option<ClusterStat>,
}

/// One held lock.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct LockStat {
    /// The key.
    pub key: String,
    /// An opaque number naming the holder's connection.
    pub owner_conn_id: u64,
    /// Seconds until the lease runs out.
    pub lease_expires_in_s: f64,
    /// Queued waiters.
    pub waiters: u64,
}

/// One semaphore.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct SemaphoreStat {
    /// The key.
    pub key: String,
    /// Its holder limit.
    pub limit: u64,
    /// Slots held.
    pub holders: u64,
    /// Queued waiters.
    pub waiters: u64,
}

/// A key nobody holds or waits for.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct IdleStat {
    /// The key.
    pub key: String,
    /// Seconds since it was last used.
    pub idle_s: f64,
}

/// The listeners of one (pattern, group).
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ChannelStat {
    /// The pattern listened to.
    pub pattern: String,
    /// The queue group (empty for plain subscribers).
    pub group: String,
    /// Connections listening.
    pub listeners: u64,
}

/// The `cluster` object of a node in cluster mode.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ClusterStat {
    /// This node's id.
    pub node_id: u64,
    /// The leader this node knows of (0: none).
    pub leader_id: u64,
    /// The current Raft term.
    pub term: u64,
}

impl Stats {
    /// Parses the JSON object of a `stats` reply. Unknown fields are
    /// ignored; a missing list is empty.
    pub fn parse(json: &str) -> Result<Stats> {
        let v: Value = serde_json::from_str(json)
            .map_err(|e| Error::Protocol(format!("stats reply is not JSON: {e}")))?;
        let o = v
            .as_object()
            .ok_or_else(|| Error::Protocol("stats reply is not a JSON object".into()))?;
        Ok(Stats {
            connections: uint(o, "connections")?,
            locks: list(o, "locks", |o| {
                Ok(LockStat {
                    key: string(o, "key")?,
                    owner_conn_id: uint(o, "owner_conn_id")?,
                    lease_expires_in_s: float(o, "lease_expires_in_s")?,
                    waiters: uint(o, "waiters")?,
                })
            })?,
            semaphores: list(o, "semaphores", |o| {
                Ok(SemaphoreStat {
                    key: string(o, "key")?,
                    limit: uint(o, "limit")?,
                    holders: uint(o, "holders")?,
                    waiters: uint(o, "waiters")?,
                })
            })?,
            idle_locks: list(o, "idle_locks", idle)?,
            idle_semaphores: list(o, "idle_semaphores", idle)?,
            signal_channels: list(o, "signal_channels", |o| {
                Ok(ChannelStat {
                    pattern: string(o, "pattern")?,
                    group: string(o, "group")?,
                    listeners: uint(o, "listeners")?,
                })
            })?,
            cluster: match o.get("cluster") {
                None | Some(Value::Null) => None,
                Some(Value::Object(c)) => Some(ClusterStat {
                    node_id: uint(c, "node_id")?,
                    leader_id: uint(c, "leader_id")?,
                    term: uint(c, "term")?,
                }),
                Some(_) => return Err(bad("cluster")),
            },
        })
    }
}

fn idle(o: &Map<String, Value>) -> Result<IdleStat> {
    Ok(IdleStat {
        key: string(o, "key")?,
        idle_s: float(o, "idle_s")?,
    })
}

fn list<T>(
    o: &Map<String, Value>,
    name: &str,
    item: impl Fn(&Map<String, Value>) -> Result<T>,
) -> Result<Vec<T>> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_object().ok_or_else(|| bad(name)).and_then(&item))
            .collect(),
        Some(_) => Err(bad(name)),
    }
}

fn uint(o: &Map<String, Value>, name: &str) -> Result<u64> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v.as_u64().ok_or_else(|| bad(name)),
    }
}

fn float(o: &Map<String, Value>, name: &str) -> Result<f64> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(0.0),
        Some(v) => v.as_f64().ok_or_else(|| bad(name)),
    }
}

fn string(o: &Map<String, Value>, name: &str) -> Result<String> {
    match o.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Ok(String::new()),
        Some(v) => Ok(v.to_string()),
    }
}

fn bad(field: &str) -> Error {
    Error::Protocol(format!("stats field {field:?} has an unexpected type"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let s = Stats::parse(
            r#"{"connections":3,
            "locks":[{"key":"k","owner_conn_id":4294967296,"lease_expires_in_s":32.5,"waiters":1}],
            "semaphores":[{"key":"pool","limit":3,"holders":2,"waiters":0}],
            "idle_locks":[{"key":"old","idle_s":12.25}],
            "idle_semaphores":[],
            "signal_channels":[{"pattern":"jobs.*","group":"workers","listeners":3}],
            "cluster":{"node_id":2,"leader_id":1,"term":7,"extra":true}}"#,
        )
        .unwrap();
        assert_eq!(s.connections, 3);
        assert_eq!(s.locks[0].key, "k");
        assert_eq!(s.locks[0].owner_conn_id, 4294967296);
        assert_eq!(s.locks[0].lease_expires_in_s, 32.5);
        assert_eq!(s.semaphores[0].holders, 2);
        assert_eq!(s.idle_locks[0].idle_s, 12.25);
        assert_eq!(s.signal_channels[0].group, "workers");
        let c = s.cluster.unwrap();
        assert_eq!((c.node_id, c.leader_id, c.term), (2, 1, 7));
    }

    #[test]
    fn rejects_what_is_not_stats() {
        assert!(Stats::parse("not json").is_err());
        assert!(Stats::parse("[1]").is_err());
        assert!(Stats::parse(r#"{"locks":5}"#).is_err());
        assert!(Stats::parse(r#"{"connections":-1}"#).is_err());
        assert_eq!(Stats::parse("{}").unwrap(), Stats::default());
    }
}
