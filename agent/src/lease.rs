//! Election of the one maintenance runner with a `coordination.k8s.io/v1`
//! Lease, the way client-go's leader election does it: the holder renews
//! `renewTime`; anyone may take the lease once it has seen the lease record
//! unchanged for `leaseDurationSeconds` on its own monotonic clock. The
//! times written in the lease are never compared with the local clock, so
//! nodes whose clocks disagree neither steal a live lease nor wait on a
//! dead one. Writes carry the `resourceVersion` read, so two agents racing
//! for an expired lease cannot both win (409 Conflict).
//!
//! The last maintenance times are kept in the Lease's annotations, so a new
//! holder continues the cadence instead of starting over.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::Client;

use crate::error::{is_conflict, Error, Result};

pub const LAST_QUICK: &str = "marmoset.dev/last-quick-maintenance";
pub const LAST_FULL: &str = "marmoset.dev/last-full-maintenance";

pub struct LeaderLease {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's record as last seen, and when it was first seen
    /// in that state (local monotonic time).
    observed: Mutex<Option<(Record, Instant)>>,
}

/// What identifies one renewal of a lease: any change restarts the wait.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<String>,
    duration_secs: Option<i32>,
    transitions: Option<i32>,
}

/// What one election round saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub leader: bool,
    pub holder: Option<String>,
    pub annotations: BTreeMap<String, String>,
}

impl LeaseState {
    pub fn time(&self, key: &str) -> Option<DateTime<Utc>> {
        self.annotations
            .get(key)
            .and_then(|v| DateTime::parse_from_rfc3339(v).ok())
            .map(|t| t.with_timezone(&Utc))
    }
}

impl LeaderLease {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: Mutex::new(None),
        }
    }

    /// Whether the lease record has stayed unchanged for its own duration
    /// since this candidate first saw it so.
    fn expired_by_observation(&self, spec: &LeaseSpec) -> bool {
        let record = Record {
            holder: spec.holder_identity.clone(),
            renew_time: spec.renew_time.as_ref().map(|t| t.0.to_string()),
            duration_secs: spec.lease_duration_seconds,
            transitions: spec.lease_transitions,
        };
        let Some(secs) = spec.lease_duration_seconds else {
            return true;
        };
        let Ok(mut seen) = self.observed.lock() else {
            return false;
        };
        match &*seen {
            Some((r, at)) if *r == record => {
                at.elapsed() > Duration::from_secs(u64::try_from(secs).unwrap_or(0))
            }
            _ => {
                *seen = Some((record, Instant::now()));
                false
            }
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Acquires or renews the lease; `leader` says whether we hold it now.
    pub async fn try_acquire_or_renew(&self) -> Result<LeaseState> {
        self.round(None).await
    }

    /// Renews the lease and records `key = at` in its annotations; fails
    /// quietly (leader = false) when the lease was lost meanwhile.
    pub async fn record(&self, key: &str, at: DateTime<Utc>) -> Result<LeaseState> {
        self.round(Some((key, at))).await
    }

    /// Gives the lease up (on shutdown), so another agent need not wait for
    /// it to expire.
    pub async fn release(&self) -> Result<()> {
        let Some(mut lease) = self.get().await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(Error::kube(format!("release lease {}", self.name), e)),
        }
    }

    async fn get(&self) -> Result<Option<Lease>> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| Error::kube(format!("get lease {}", self.name), e))
    }

    async fn round(&self, note: Option<(&str, DateTime<Utc>)>) -> Result<LeaseState> {
        match self.get().await? {
            None => self.create(note).await,
            Some(lease) => self.take_or_renew(lease, note).await,
        }
    }

    fn won(&self, annotations: BTreeMap<String, String>) -> LeaseState {
        LeaseState {
            leader: true,
            holder: Some(self.identity.clone()),
            annotations,
        }
    }

    fn secs(&self) -> i32 {
        i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// First agent ever: creates the lease, holding it.
    async fn create(&self, note: Option<(&str, DateTime<Utc>)>) -> Result<LeaseState> {
        let now = MicroTime(jiff::Timestamp::now());
        let mut annotations = BTreeMap::new();
        if let Some((k, at)) = note {
            annotations.insert(k.to_string(), at.to_rfc3339());
        }
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                annotations: Some(annotations.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(self.secs()),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(self.won(annotations)),
            // Someone created it first: they lead this round.
            Err(e) if is_conflict(&e) => Ok(LeaseState {
                leader: false,
                holder: None,
                annotations,
            }),
            Err(e) => Err(Error::kube(format!("create lease {}", self.name), e)),
        }
    }

    /// Renews our lease, or takes an expired or released one.
    async fn take_or_renew(
        &self,
        mut lease: Lease,
        note: Option<(&str, DateTime<Utc>)>,
    ) -> Result<LeaseState> {
        let now = jiff::Timestamp::now();
        let mut annotations = lease.metadata.annotations.clone().unwrap_or_default();
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(&self.identity);
        if !ours && holder.is_some() && !self.expired_by_observation(&spec) {
            return Ok(LeaseState {
                leader: false,
                holder,
                annotations,
            });
        }
        let mut new_spec = spec.clone();
        new_spec.holder_identity = Some(self.identity.clone());
        new_spec.lease_duration_seconds = Some(self.secs());
        new_spec.renew_time = Some(MicroTime(now));
        if !ours {
            new_spec.acquire_time = Some(MicroTime(now));
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        lease.spec = Some(new_spec);
        if let Some((k, at)) = note {
            annotations.insert(k.to_string(), at.to_rfc3339());
        }
        lease.metadata.annotations = Some(annotations.clone());
        // The resourceVersion read above makes this a compare-and-swap.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(self.won(annotations)),
            Err(e) if is_conflict(&e) => Ok(LeaseState {
                leader: false,
                holder,
                annotations,
            }),
            Err(e) => Err(Error::kube(format!("update lease {}", self.name), e)),
        }
    }
}
