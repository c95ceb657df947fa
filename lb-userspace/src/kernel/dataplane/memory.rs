//! A dataplane in memory: the maps' state and a log of every write, for tests.

use super::{Dataplane, DataplaneError};
use crate::model::plan::{Limits, State, Write, apply_to_state};

#[derive(Debug)]
pub struct MemoryDataplane {
    pub limits: Limits,
    pub state: State,
    /// Every write performed, in order.
    pub log: Vec<Write>,
}

impl MemoryDataplane {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            state: State::default(),
            log: Vec::new(),
        }
    }
}

impl Dataplane for MemoryDataplane {
    fn limits(&self) -> Limits {
        self.limits
    }

    fn read(&self) -> Result<State, DataplaneError> {
        Ok(self.state.clone())
    }

    fn write(&mut self, w: &Write) -> Result<(), DataplaneError> {
        apply_to_state(&mut self.state, w, self.limits.table_size);
        self.log.push(w.clone());
        Ok(())
    }
}
