//! Everything that talks to the kernel: the embedded XDP object and its loading with sizes
//! ([`program`], [`mapmem`]), the pinned maps and their migrations ([`pindir`], [`migrate`],
//! [`mapping`], [`ring`], [`flowmap`]), the [`dataplane::Dataplane`] that writes a plan into
//! them, read-only views of them ([`inspect`]), the XDP attachments and their mode ([`links`],
//! [`xdpmode`], [`decap`]), next hops ([`nexthop`]), announced routes ([`announce`]) and
//! capabilities ([`privilege`]).
//!
//! May use: [`crate::model`].
pub mod announce;
pub mod dataplane;
pub mod decap;
pub mod flowmap;
pub mod inspect;
pub mod leastconn;
pub mod links;
pub mod mapmem;
pub mod mapping;
pub mod migrate;
pub mod nexthop;
pub mod pindir;
pub mod privilege;
pub mod program;
pub mod ring;
pub mod xdpmode;
