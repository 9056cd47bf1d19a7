//! `Quota`: places for long-lived requests (parked fetches, watch streams), counted in all and
//! per key in each of a few dimensions (per namespace, per caller), each count capped, so that
//! one caller or one namespace cannot take every place.
//!
//! A [`Place`] holds its counts until it is dropped. The total is published on a `watch`
//! channel, for status and for tests that wait for requests to be in place.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// One limit: how many, and the setting that says so (named in refusals).
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub max: usize,
    pub setting: &'static str,
}

/// Why a place was refused: the limit reached, and the key it was reached for (`None`: the
/// total).
#[derive(Debug, PartialEq, Eq)]
pub struct Full {
    pub setting: &'static str,
    pub count: usize,
    pub key: Option<String>,
}

/// Places in all, and per key of each dimension.
pub struct Quota {
    total: watch::Sender<usize>,
    max_total: Limit,
    /// One per dimension: its limit, and the count of each key with a place.
    dimensions: Mutex<Vec<(Limit, HashMap<String, usize>)>>,
}

impl Quota {
    pub fn new(total: Limit, per_key: &[Limit]) -> Arc<Self> {
        Arc::new(Self {
            total: watch::channel(0).0,
            max_total: total,
            dimensions: Mutex::new(per_key.iter().map(|l| (*l, HashMap::new())).collect()),
        })
    }

    /// Places held now.
    pub fn held(&self) -> watch::Receiver<usize> {
        self.total.subscribe()
    }

    /// A place for a request with `keys` (one per dimension, in order), or the first limit in
    /// the way.
    pub fn take(self: &Arc<Self>, keys: &[&str]) -> Result<Place, Full> {
        let mut dims = self.dimensions.lock().unwrap_or_else(|e| e.into_inner());
        for ((limit, counts), key) in dims.iter().zip(keys) {
            let count = counts.get(*key).copied().unwrap_or(0);
            if count >= limit.max {
                return Err(Full {
                    setting: limit.setting,
                    count,
                    key: Some(key.to_string()),
                });
            }
        }
        let mut taken = false;
        self.total.send_if_modified(|n| {
            taken = *n < self.max_total.max;
            if taken {
                *n += 1;
            }
            taken
        });
        if !taken {
            return Err(Full {
                setting: self.max_total.setting,
                count: self.max_total.max,
                key: None,
            });
        }
        for ((_, counts), key) in dims.iter_mut().zip(keys) {
            *counts.entry(key.to_string()).or_default() += 1;
        }
        Ok(Place {
            quota: self.clone(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        })
    }
}

/// A place held until dropped.
pub struct Place {
    quota: Arc<Quota>,
    keys: Vec<String>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut dims = self
            .quota
            .dimensions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for ((_, counts), key) in dims.iter_mut().zip(&self.keys) {
            if let Some(n) = counts.get_mut(key) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(key);
                }
            }
        }
        drop(dims);
        self.quota.total.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn limit(max: usize, setting: &'static str) -> Limit {
        Limit { max, setting }
    }

    #[test]
    fn places_are_capped_in_all_and_per_key_and_come_back_when_dropped() {
        let q = Quota::new(
            limit(4, "total"),
            &[limit(2, "per_namespace"), limit(3, "per_caller")],
        );
        let a = q.take(&["ns1", "alice"]).unwrap();
        let _b = q.take(&["ns1", "alice"]).unwrap();
        assert_eq!(
            q.take(&["ns1", "bob"]).err().map(|f| f.setting),
            Some("per_namespace")
        );
        let _c = q.take(&["ns2", "alice"]).unwrap();
        assert_eq!(
            q.take(&["ns3", "alice"]).err().map(|f| f.setting),
            Some("per_caller")
        );
        let _d = q.take(&["ns3", "bob"]).unwrap();
        assert_eq!(
            q.take(&["ns4", "carol"]).err(),
            Some(Full {
                setting: "total",
                count: 4,
                key: None
            })
        );
        assert_eq!(*q.held().borrow(), 4);
        drop(a);
        assert_eq!(*q.held().borrow(), 3);
        assert!(q.take(&["ns1", "carol"]).is_ok());
    }
}
