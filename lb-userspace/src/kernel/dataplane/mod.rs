//! Where map writes go: the kernel ([`aya::AyaDataplane`]) or memory ([`memory::MemoryDataplane`],
//! for tests). The agent talks to the trait only.

pub mod kernel;
pub mod memory;

use crate::model::plan::{Limits, Plan, State, Write};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("writing {what}")]
    Write {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {what}")]
    Read {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub trait Dataplane {
    /// Sizes the program was loaded with.
    fn limits(&self) -> Limits;
    /// What the maps hold now.
    fn read(&self) -> Result<State, DataplaneError>;
    /// Performs one write.
    fn write(&mut self, w: &Write) -> Result<(), DataplaneError>;

    /// Performs a plan's writes in order, stopping at the first failure (the maps then hold a
    /// safe intermediate state: every prefix of a plan is safe).
    fn apply(&mut self, plan: &Plan) -> Result<(), DataplaneError> {
        plan.writes.iter().try_for_each(|w| self.write(w))
    }
}
