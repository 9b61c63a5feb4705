//! Arrow Flight SQL over the history, for ADBC and JDBC drivers and BI tools.
//!
//! Statements and prepared statements (the handle is the SQL text, so any server
//! instance can run any ticket), and the catalog calls tools use to browse: catalogs,
//! schemas, tables (with their Arrow schemas) and table types. Everything runs through
//! [`History`], so the same read-only rules and limits apply as for `POST /api/sql`.
//!
//! Callers authenticate with `authorization: Bearer KEY` on every call, or once with a
//! Basic handshake whose password is the key (the answer carries the bearer header to
//! use). Which keys may query is decided by the [`Authenticate`] function the binary
//! passes in.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse,
    IpcMessage, SchemaAsIpc, Ticket,
};
use base64::Engine as _;
use futures_util::{Stream, StreamExt, TryStreamExt};
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::connections::{self, ConnectionLimits};
use crate::error::{AnalyticsError, Result};
use crate::sql::History;

/// Decides whether an `authorization` value from a peer may query: the caller's name, or
/// why not. The peer is `None` when unknown, or when the call says a proxy forwarded it
/// (see [`forwarded`]): then the peer is not the client.
pub type Authenticate = Arc<
    dyn Fn(Option<&[u8]>, Option<SocketAddr>) -> std::result::Result<String, String> + Send + Sync,
>;

/// The peer of `request` as a client: none when a proxy forwarded the call.
fn client_peer<T>(request: &Request<T>) -> Option<SocketAddr> {
    let forwarded = schemas::FORWARDING_HEADERS
        .iter()
        .any(|key| request.metadata().contains_key(*key));
    if forwarded {
        None
    } else {
        request.remote_addr()
    }
}

const CATALOG: &str = "datafusion";
const SCHEMA: &str = "public";

/// The Flight SQL service.
#[derive(Clone)]
pub struct FlightSql {
    history: History,
    authenticate: Authenticate,
}

impl std::fmt::Debug for FlightSql {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlightSql")
            .field("history", &self.history)
            .finish_non_exhaustive()
    }
}

/// Serves Flight SQL on `listener` until `shutdown`, its connections bounded by `limits`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    history: History,
    authenticate: Authenticate,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> Result<()> {
    // A connection past its age gets the SQL time limit and a margin for its calls, then
    // is closed whatever it does (a peer may ignore the GOAWAY).
    let grace = Duration::from_secs(history.limits().sql_timeout_secs.max(1) + 10);
    let service = FlightServiceServer::new(FlightSql {
        history,
        authenticate,
    })
    .max_decoding_message_size(1024 * 1024)
    .max_encoding_message_size(64 * 1024 * 1024);
    let stop_accepting = shutdown.child_token();
    let (incoming, accept) = connections::incoming(listener, limits, grace, stop_accepting.clone());
    let server = async {
        // At its age a connection gets a GOAWAY (tonic sends none when it is also given
        // a grace: it then only cuts the connection, so the cut is ours, in `connections`).
        let served = tonic::transport::Server::builder()
            .concurrency_limit_per_connection(16)
            .max_connection_age(limits.max_age)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await;
        stop_accepting.cancel();
        served
    };
    let (served, ()) = tokio::join!(server, accept);
    served.map_err(|e| AnalyticsError::Task {
        reason: format!("Flight SQL server: {e}"),
    })
}

/// What `GetSqlInfo` tells tools about this server: its name and version, and that it is
/// read-only.
fn sql_info() -> std::result::Result<SqlInfoData, Status> {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "dronedelivery history");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.5");
    builder.append(SqlInfo::FlightSqlServerReadOnly, true);
    builder.append(SqlInfo::FlightSqlServerSql, true);
    builder.append(SqlInfo::FlightSqlServerSubstrait, false);
    builder.append(SqlInfo::FlightSqlServerTransaction, 0_i32);
    builder.append(SqlInfo::FlightSqlServerCancel, false);
    builder.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    builder.build().map_err(|e| Status::internal(e.to_string()))
}

type DataStream =
    Pin<Box<dyn Stream<Item = std::result::Result<arrow_flight::FlightData, Status>> + Send>>;

fn to_status(e: AnalyticsError) -> Status {
    match &e {
        AnalyticsError::ReadOnly { .. } => Status::permission_denied(e.to_string()),
        AnalyticsError::Timeout { .. } => Status::deadline_exceeded(e.to_string()),
        _ if e.is_over_limit() => Status::resource_exhausted(e.to_string()),
        AnalyticsError::Query { .. } => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

impl FlightSql {
    fn caller<T>(&self, request: &Request<T>) -> std::result::Result<String, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(MetadataValue::as_bytes);
        (self.authenticate)(authorization, client_peer(request)).map_err(Status::unauthenticated)
    }

    fn sql_of(handle: &[u8]) -> std::result::Result<&str, Status> {
        std::str::from_utf8(handle)
            .map_err(|_| Status::invalid_argument("the handle is not UTF-8 SQL"))
    }

    async fn info(
        &self,
        sql: &str,
        ticket: Ticket,
        descriptor: FlightDescriptor,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let schema = self.history.schema(sql).await.map_err(to_status)?;
        let info = FlightInfo::new()
            .try_with_schema(&schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    async fn run(&self, sql: &str) -> std::result::Result<Response<DataStream>, Status> {
        // The result streams batch by batch within the query's limits; past one, the
        // stream ends with the limit's status (RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED).
        let result = self.history.query_stream(sql).await.map_err(to_status)?;
        let schema = result.schema();
        let batches = result.into_stream().map(|batch| {
            batch.map_err(|e| arrow_flight::error::FlightError::Tonic(Box::new(to_status(e))))
        });
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(Status::from);
        Ok(Response::new(stream.boxed()))
    }

    fn ticket_info<T: ProstMessageExt>(
        command: &T,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        let ticket = Ticket {
            ticket: command.as_any().encode_to_vec().into(),
        };
        let info = FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(e.to_string()))?
            .with_endpoint(FlightEndpoint::new().with_ticket(ticket))
            .with_descriptor(descriptor);
        Ok(Response::new(info))
    }

    fn one_batch<E: Into<arrow_flight::error::FlightError> + Send + 'static>(
        schema: arrow::datatypes::SchemaRef,
        batch: std::result::Result<arrow::record_batch::RecordBatch, E>,
    ) -> Response<DataStream> {
        let stream = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(futures_util::stream::once(async move {
                batch.map_err(Into::into)
            }))
            .map_err(Status::from);
        Response::new(stream.boxed())
    }
}

#[tonic::async_trait]
impl FlightSqlService for FlightSql {
    type FlightService = Self;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<
        Response<
            Pin<Box<dyn Stream<Item = std::result::Result<HandshakeResponse, Status>> + Send>>,
        >,
        Status,
    > {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        // Basic user:KEY becomes Bearer KEY; a Bearer header is checked as it is.
        let bearer = match header.strip_prefix("Basic ") {
            Some(encoded) => {
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(encoded.trim())
                    .map_err(|_| Status::unauthenticated("the Basic credentials are not base64"))?;
                let text = String::from_utf8(decoded)
                    .map_err(|_| Status::unauthenticated("the Basic credentials are not UTF-8"))?;
                let key = text.split_once(':').map_or(text.as_str(), |(_, key)| key);
                format!("Bearer {key}")
            }
            None => header,
        };
        let peer = client_peer(&request);
        (self.authenticate)((!bearer.is_empty()).then_some(bearer.as_bytes()), peer)
            .map_err(Status::unauthenticated)?;
        let token = bearer
            .strip_prefix("Bearer ")
            .unwrap_or_default()
            .to_owned();
        let answer = HandshakeResponse {
            protocol_version: 0,
            payload: token.into_bytes().into(),
        };
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(futures_util::stream::iter([Ok(answer)]).boxed());
        if let Ok(value) = MetadataValue::try_from(bearer.as_str()) {
            response.metadata_mut().insert("authorization", value);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let ticket = TicketStatementQuery {
            statement_handle: query.query.clone().into_bytes().into(),
        };
        let ticket = Ticket {
            ticket: ticket.as_any().encode_to_vec().into(),
        };
        self.info(&query.query, ticket, request.into_inner()).await
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request)?;
        self.run(Self::sql_of(&ticket.statement_handle)?).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> std::result::Result<ActionCreatePreparedStatementResult, Status> {
        self.caller(&request)?;
        let schema = self.history.schema(&query.query).await.map_err(to_status)?;
        let IpcMessage(dataset_schema) = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema,
            parameter_schema: Default::default(),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        command: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let sql = Self::sql_of(&command.prepared_statement_handle)?.to_owned();
        let ticket = Ticket {
            ticket: command.as_any().encode_to_vec().into(),
        };
        self.info(&sql, ticket, request.into_inner()).await
    }

    async fn do_get_prepared_statement(
        &self,
        command: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request)?;
        self.run(Self::sql_of(&command.prepared_statement_handle)?)
            .await
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> std::result::Result<(), Status> {
        self.caller(&request)?;
        Ok(())
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.into_builder().schema();
        Self::ticket_info(&query, &schema, request.into_inner())
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        Ok(Self::one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.clone().into_builder().schema();
        Self::ticket_info(&query, &schema, request.into_inner())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        Ok(Self::one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = query.clone().into_builder().schema();
        Self::ticket_info(&query, &schema, request.into_inner())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request)?;
        let mut builder = query.into_builder();
        for table in schemas::history::TABLES {
            let mut fields: Vec<arrow::datatypes::FieldRef> =
                (table.schema)().fields().iter().cloned().collect();
            fields.push(Arc::new(arrow::datatypes::Field::new(
                schemas::history::DATE_PARTITION,
                arrow::datatypes::DataType::Utf8,
                false,
            )));
            builder
                .append(CATALOG, SCHEMA, table.name, "TABLE", &Schema::new(fields))
                .map_err(Status::from)?;
        }
        for (name, _) in crate::sql::VIEWS {
            let schema = self
                .history
                .schema(&format!("SELECT * FROM {name}"))
                .await
                .map_err(to_status)?;
            builder
                .append(CATALOG, SCHEMA, name, "VIEW", &schema)
                .map_err(Status::from)?;
        }
        Ok(Self::one_batch(builder.schema(), builder.build()))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let schema = Arc::new(Schema::new(vec![arrow::datatypes::Field::new(
            "table_type",
            arrow::datatypes::DataType::Utf8,
            false,
        )]));
        Self::ticket_info(&query, &schema, request.into_inner())
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request)?;
        let schema = Arc::new(Schema::new(vec![arrow::datatypes::Field::new(
            "table_type",
            arrow::datatypes::DataType::Utf8,
            false,
        )]));
        let batch = arrow::record_batch::RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(arrow::array::StringArray::from(vec![
                "TABLE", "VIEW",
            ]))],
        );
        Ok(Self::one_batch(schema, batch))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        self.caller(&request)?;
        let info = sql_info()?;
        let schema = query.clone().into_builder(&info).schema();
        Self::ticket_info(&query, &schema, request.into_inner())
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.caller(&request)?;
        let info = sql_info()?;
        let builder = query.into_builder(&info);
        Ok(Self::one_batch(builder.schema(), builder.build()))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
