//! Gauges per lane (namespace, queue): its steps leased, queued, and held by its pause or
//! in-flight limit. They are read from the database when the metrics are collected, not on a
//! timer: a collection reports what the read after the previous collection found (one export
//! interval old at most) and asks for the next read, so a service nobody collects metrics from
//! reads nothing, and the hop never pays for them.

use std::sync::{Arc, Mutex};

use opentelemetry::metrics::{Meter, ObservableGauge};
use opentelemetry::KeyValue;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::{LaneSettings, Store};

/// The lane gauges and the reader that refreshes them.
pub struct LaneGauges {
    _gauges: Vec<ObservableGauge<u64>>,
    refreshed: watch::Receiver<u64>,
}

type Snapshot = Arc<Mutex<Vec<LaneSettings>>>;

impl LaneGauges {
    /// Register the gauges and start their reader (stopped by `stop`).
    pub fn start(meter: &Meter, store: Store, stop: CancellationToken) -> (Self, JoinHandle<()>) {
        let snapshot: Snapshot = Arc::default();
        let wanted = Arc::new(Notify::new());
        let (refreshed_tx, refreshed) = watch::channel(0u64);
        let gauge =
            |name: &'static str, description: &'static str, value: fn(&LaneSettings) -> i32| {
                let (snapshot, wanted) = (snapshot.clone(), wanted.clone());
                meter
                    .u64_observable_gauge(name)
                    .with_description(description)
                    .with_unit("{step}")
                    .with_callback(move |o| {
                        for lane in snapshot.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                            o.observe(
                                u64::try_from(value(lane)).unwrap_or(0),
                                &[
                                    KeyValue::new("namespace", lane.namespace.clone()),
                                    KeyValue::new("queue", lane.queue.clone()),
                                ],
                            );
                        }
                        // one permit however many gauges ask: one read per collection
                        wanted.notify_one();
                    })
                    .build()
            };
        let gauges = vec![
            gauge(
                "queue_steps_in_flight",
                "Steps of the queue leased now",
                |l| l.in_flight,
            ),
            gauge(
                "queue_steps_queued",
                "Steps of the queue enqueued and not leased (counted up to 10000)",
                |l| l.queued,
            ),
            gauge(
                "queue_steps_held",
                "Of the queued, those the queue's pause or in-flight limit keeps from being leased now",
                |l| l.held,
            ),
        ];
        let reader = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = wanted.notified() => {}
                }
                match store.active_lanes().await {
                    Ok(lanes) => {
                        *snapshot.lock().unwrap_or_else(|p| p.into_inner()) = lanes;
                        refreshed_tx.send_modify(|n| *n += 1);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the queues' load for the metrics failed")
                    }
                }
            }
        });
        (
            Self {
                _gauges: gauges,
                refreshed,
            },
            reader,
        )
    }

    /// Counts the reads done: a collection after the count moved reports that read.
    pub fn refreshed(&self) -> watch::Receiver<u64> {
        self.refreshed.clone()
    }
}
