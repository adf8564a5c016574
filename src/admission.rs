//! Admission of new subscribers: the limits on open streams (in all, per tenant) and the
//! per-tenant token bucket on how fast streams open.
//!
//! The counts live inside the hub's lock ([`crate::hub`]) so that a subscriber's admission,
//! its receiver and its starting position agree. This module only counts: it never routes
//! a change, never reads the database and never blocks.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Admission limits for new subscribers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open streams at most (`server.max_subscribers`).
    pub max_total: usize,
    /// Open streams per tenant at most (`server.max_subscribers_per_tenant`).
    pub max_per_tenant: usize,
    /// New streams per tenant per second (`server.max_stream_rate`); bursts of twice that.
    pub rate_per_tenant: u32,
}

impl From<&crate::config::ServerConfig> for Limits {
    /// `server.max_subscribers`, `max_subscribers_per_tenant` and `max_stream_rate`.
    fn from(server: &crate::config::ServerConfig) -> Self {
        Limits {
            max_total: server.max_subscribers,
            max_per_tenant: server.max_subscribers_per_tenant,
            rate_per_tenant: server.max_stream_rate,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total: usize::MAX,
            max_per_tenant: usize::MAX,
            rate_per_tenant: u32::MAX,
        }
    }
}

/// Why a subscriber was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The gateway holds `server.max_subscribers` streams.
    #[error("the gateway is at its limit of open streams; try again later")]
    Full,
    /// The tenant holds `server.max_subscribers_per_tenant` streams.
    #[error("this tenant is at its limit of open streams")]
    TenantFull,
    /// The tenant opens streams faster than `server.max_stream_rate`.
    #[error("this tenant opens streams too fast; retry after a second")]
    TooFast,
}

/// The open subscriptions and the token buckets, checked against [`Limits`].
#[derive(Debug)]
pub(crate) struct Admission {
    /// The limits in force.
    limits: Limits,
    /// Open subscriptions in all.
    total: usize,
    /// Open subscriptions per tenant.
    per_tenant: HashMap<Arc<str>, usize>,
    /// Token buckets for new streams per tenant: (tokens, last refill).
    buckets: HashMap<Arc<str>, (f64, Instant)>,
}

impl Admission {
    /// No subscriptions yet.
    pub(crate) fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            total: 0,
            per_tenant: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// Admits one more subscription of `tenant`, or says why not.
    pub(crate) fn admit(&mut self, tenant: &Arc<str>) -> Result<(), Refused> {
        if self.total >= self.limits.max_total {
            return Err(Refused::Full);
        }
        if self.per_tenant.get(tenant).copied().unwrap_or(0) >= self.limits.max_per_tenant {
            return Err(Refused::TenantFull);
        }
        if !self.take_token(tenant) {
            return Err(Refused::TooFast);
        }
        self.total += 1;
        *self.per_tenant.entry(Arc::clone(tenant)).or_insert(0) += 1;
        Ok(())
    }

    /// Releases a subscription of `tenant`. Returns true when it was the tenant's last.
    pub(crate) fn release(&mut self, tenant: &Arc<str>) -> bool {
        self.total -= 1;
        let Some(n) = self.per_tenant.get_mut(tenant) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        self.per_tenant.remove(tenant);
        shrink(&mut self.per_tenant);
        true
    }

    /// Open subscriptions, in all.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Takes one token from the tenant's bucket, refilled at `rate_per_tenant` per second
    /// up to twice that.
    fn take_token(&mut self, tenant: &Arc<str>) -> bool {
        if self.limits.rate_per_tenant == u32::MAX {
            return true;
        }
        let rate = f64::from(self.limits.rate_per_tenant);
        let burst = rate * 2.0;
        let now = Instant::now();
        if self.buckets.len() > 100_000 {
            // Forget tenants whose buckets are full again: they are as good as new.
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = self
            .buckets
            .entry(Arc::clone(tenant))
            .or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Gives back a map's memory once it is mostly empty: a burst of many tenants must not
/// keep its table allocated after they left.
pub(crate) fn shrink<V>(map: &mut HashMap<Arc<str>, V>) {
    if map.capacity() > 64 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}
