//! The EndpointSlice watch, for the Services lb serves only.
//!
//! A cluster-wide watch of every slice costs each agent a copy of every Service's endpoints and
//! an event for every pod that moves anywhere. The API server can filter slices by their
//! `kubernetes.io/service-name` label, so the watch selects
//! `kubernetes.io/service-name in (a,b,...)` — the names of the Services lb serves, in any
//! namespace — and restarts with a new selector when that set changes.
//!
//! Trade-offs: a restart lists the selected slices again (one list of what is served, not of
//! the cluster); the label carries no namespace, so a same-named Service elsewhere has its
//! slices delivered too (translation keys slices by namespace, so they are ignored); and a
//! selector has a length, so past [`MAX_NAMES`] names the watch selects every slice that
//! belongs to a Service, as before. All restarts share one store: the old contents keep
//! serving until the new list is complete (the reflector swaps at the end of a list).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use futures::StreamExt as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        reflector::{Store, store::Writer},
        watcher,
    },
};
use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};

/// The label every EndpointSlice of a Service carries.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Past this many names the selector would be too long for a URL: select all slices instead.
pub const MAX_NAMES: usize = 500;

/// The label selector for the slices of `names`.
pub fn selector(names: &BTreeSet<String>) -> Option<String> {
    match names.len() {
        0 => None,
        n if n > MAX_NAMES => Some(SERVICE_NAME_LABEL.to_string()),
        _ => Some(format!(
            "{SERVICE_NAME_LABEL} in ({})",
            names
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(",")
        )),
    }
}

pub struct SliceWatch {
    client: Client,
    writer: Arc<Mutex<Writer<DynamicObject>>>,
    store: Store<DynamicObject>,
    changed: mpsc::Sender<()>,
    /// The names each source wants, and the selector the running watch has.
    wants: BTreeMap<&'static str, BTreeSet<String>>,
    running: Option<(Option<String>, JoinHandle<()>)>,
}

impl SliceWatch {
    /// Not watching yet: [`SliceWatch::want`] starts it.
    pub fn new(client: Client, changed: mpsc::Sender<()>) -> Self {
        let writer = Writer::new(ApiResource::erase::<EndpointSlice>(&()));
        let store = writer.as_reader();
        Self {
            client,
            writer: Arc::new(Mutex::new(writer)),
            store,
            changed,
            wants: BTreeMap::new(),
            running: None,
        }
    }

    pub fn store(&self) -> Store<DynamicObject> {
        self.store.clone()
    }

    /// Sets what `source` wants; restarts the watch if the selector changes.
    pub fn want(&mut self, source: &'static str, names: BTreeSet<String>) {
        self.wants.insert(source, names);
        let all: BTreeSet<String> = self.wants.values().flatten().cloned().collect();
        let sel = selector(&all);
        if self.running.as_ref().is_some_and(|(s, _)| *s == sel) {
            return;
        }
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
        info!(
            selector = sel.as_deref().unwrap_or("(none)"),
            "watching EndpointSlices"
        );
        let task = match &sel {
            Some(sel) => self.spawn(sel),
            None => {
                // Nothing to watch: an empty, complete list (the store is ready and empty).
                let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
                w.apply_watcher_event(&watcher::Event::Init);
                w.apply_watcher_event(&watcher::Event::InitDone);
                let _ = self.changed.try_send(());
                tokio::spawn(async {})
            }
        };
        self.running = Some((sel, task));
    }

    fn spawn(&self, selector: &str) -> JoinHandle<()> {
        let api = Api::<DynamicObject>::all_with(
            self.client.clone(),
            &ApiResource::erase::<EndpointSlice>(&()),
        );
        let config = watcher::Config::default().labels(selector);
        let (writer, tx) = (self.writer.clone(), self.changed.clone());
        tokio::spawn(async move {
            let stream = watcher(api, config).default_backoff();
            futures::pin_mut!(stream);
            let mut failing = false;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(ev) => {
                        writer
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .apply_watcher_event(&ev);
                        if failing {
                            info!("watching EndpointSlices again");
                            failing = false;
                        }
                        let _ = tx.try_send(());
                    }
                    Err(e) => {
                        warn!(
                            "watching EndpointSlices failed, retrying (the last state keeps serving): {}",
                            crate::error_chain(&e)
                        );
                        failing = true;
                    }
                }
            }
        })
    }

    pub fn stop(&mut self) {
        if let Some((_, task)) = self.running.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_selector_names_each_service_once_and_gives_up_past_the_limit() {
        let names = |n: usize| (0..n).map(|i| format!("svc-{i}")).collect::<BTreeSet<_>>();
        assert_eq!(selector(&names(0)), None);
        assert_eq!(
            selector(&["web".to_string(), "api".to_string()].into()).as_deref(),
            Some("kubernetes.io/service-name in (api,web)")
        );
        assert_eq!(
            selector(&names(MAX_NAMES + 1)).as_deref(),
            Some("kubernetes.io/service-name")
        );
    }
}
