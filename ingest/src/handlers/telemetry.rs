//! `POST /api/drones/{id}/telemetry`: drone position fixes to `drone-telemetry`.
//!
//! It owns who may post telemetry, the single-fix-or-batch body and the validation of
//! each fix. It must not import the routes or the server.

use bus::OutRecord;
use hyper::body::Incoming;
use hyper::{Request, Response};
use schemas::headers as h;

use crate::admission::{Decoded, read_decoded};
use crate::batch;
use crate::body::Body;
use crate::error::{IngestError, Result};
use crate::outcome::Outcome;
use crate::produce::{self, Caller, Headers};
use crate::response::{batch_report, count_outcomes, report_response};
use crate::state::App;

/// `POST /api/drones/{id}/telemetry`: one position fix, or a batch of them (JSON array or
/// NDJSON, optionally gzip or zstd), to `drone-telemetry` keyed by drone id. Answers as
/// the delivery request batch does, without ids.
pub(crate) async fn post_telemetry(
    app: &App,
    req: Request<Incoming>,
    caller: &Caller<'_>,
    drone_id: &str,
) -> Result<Response<Body>> {
    if !caller.tenant.telemetry {
        return Err(IngestError::Forbidden {
            reason: format!(
                "tenant {} may not post drone telemetry: only the keys of fleet tenants \
                 (--telemetry-tenants) may",
                &*caller.tenant.name
            ),
        });
    }
    let mut admission = app.budgets.admit(caller.tenant)?;
    let Decoded { framing, body } = read_decoded(
        req,
        app.config.tier.max_batch_bytes,
        caller.tenant,
        &mut admission,
    )
    .await?;
    schemas::delivery::check_id(drone_id, "droneId")?;
    let first = body.iter().find(|b| !b.is_ascii_whitespace()).copied();
    let records = if first == Some(b'{') && framing != Some(batch::Framing::Ndjson) {
        vec![body.trim_ascii()]
    } else {
        batch::split(&body, framing, app.config.tier.max_batch_records)?
    };
    caller.tenant.take(records.len())?;
    let mut headers = Headers::of(caller, h::event_type::DRONE_POSITION_REPORTED);
    headers.push(h::DRONE_ID, drone_id.as_bytes());
    let mut outcomes = Vec::with_capacity(records.len());
    let mut acks = bus::Acks::with_capacity(records.len());
    let mut sent_as = Vec::with_capacity(records.len());
    for (index, payload) in records.iter().enumerate() {
        let checked = batch::check_record_size(payload, app.config.tier.max_record_bytes)
            .and_then(|()| schemas::telemetry::parse_position_fix(payload).map(|_| ()));
        if let Err(e) = checked {
            outcomes.push(Outcome::Rejected(e));
            continue;
        }
        let sent = app
            .producer()?
            .enqueue(
                &mut acks,
                OutRecord {
                    topic: schemas::topics::DRONE_TELEMETRY.name,
                    key: drone_id.as_bytes(),
                    payload,
                    headers: headers.as_slice(),
                },
                None,
                false,
            )
            .map_err(produce::unavailable);
        match sent {
            Ok(_) => {
                sent_as.push(index);
                outcomes.push(Outcome::Accepted(None));
            }
            Err(e) => outcomes.push(Outcome::failed(e)),
        }
    }
    produce::settle(app, &mut outcomes, acks, &sent_as).await;
    count_outcomes(caller.tenant, &outcomes);
    let (status, report) = batch_report(&outcomes);
    Ok(report_response(status, report))
}
