//! The shared vocabulary of the pipeline: event and API types, validation rules, the Arrow
//! schemas of the history tables and the table of topics.
//!
//! Every service meets the others only through the topics named here, so this crate is the
//! one place where a topic's name, key and partition count, a header's name or a field's
//! rules are decided.
//!
//! This crate must stay free of I/O: no tokio, rdkafka, hyper, object_store or datafusion.
//! Everything in it is pure and unit-tested.

pub mod delivery;
pub mod generate;
pub mod headers;
pub mod history;
pub mod signing;
pub mod telemetry;
pub mod topics;
pub mod tracking;
pub mod webhooks;

pub use delivery::{
    ConfirmationType, DEFAULT_TENANT, DeliveryRequest, DeliveryReschedule, FORWARDING_HEADERS,
    Location, PackageInfo, PackageSize, ValidationError, delivery_key, parse_delivery_request,
    parse_reschedule, split_delivery_key,
};
pub use topics::Topic;
