//! The `fatura` binary: parses the command line and starts things. Everything else lives
//! in the library crates.

mod config;
mod demo;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use fatura_core::import::CatalogFormat;
use fatura_core::{Currency, MarginRate};
use fatura_server::service::Fatura;
use tokio::net::TcpListener;

use crate::config::{Config, redact_url};

/// mimalloc instead of glibc's allocator: under sustained gateway load glibc's per-thread
/// arenas crept up (~0.2 MiB a minute at 2,000 req/s while the live heap stayed flat, as
/// heaptrack showed), and memory freed after a burst was not returned to the system.
/// BENCHMARKS.md has the runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// fatura: metering, pricing and billing for AI platforms.
#[derive(Debug, Parser)]
#[command(name = "fatura", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct GlobalArgs {
    /// Configuration file (TOML). Environment variables override it; flags override both.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Database URL: sqlite://PATH (default sqlite://fatura.db; for `demo`,
    /// sqlite://fatura-demo.db) or postgres://USER@HOST/DB.
    #[arg(long, global = true, value_name = "URL")]
    database: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server (migrates the database first).
    Serve {
        /// Address to listen on (default 127.0.0.1:8080; env FATURA_LISTEN).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Start fatura, alive, for a first look: a local SQLite file with seeded customers
    /// (USD and BRL, prepaid and postpaid), plans with tiers, the price catalog shipped
    /// with fatura, months of back-filled history, and live calls through the gateway to
    /// an in-process mock upstream. Prints the dashboard URL and the admin key.
    Demo(demo::DemoArgs),
    /// Apply database migrations and exit.
    Migrate,
    /// Run a mock LLM upstream (OpenAI/OpenRouter wire format, streaming included) for
    /// tests, demos and benchmarks.
    MockUpstream(MockArgs),
    /// Manage customers.
    #[command(subcommand)]
    Customers(CustomersCommand),
    /// Manage customer API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage the price catalog.
    #[command(subcommand)]
    Prices(PricesCommand),
    /// Manage pricing plans (the JSON bodies of POST/PATCH /v1/plans).
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Manage exchange rates (USD to BRL or EUR).
    #[command(subcommand, name = "fx-rates")]
    FxRates(FxCommand),
    /// Billing: close cycles, list invoices.
    #[command(subcommand)]
    Invoices(InvoicesCommand),
}

#[derive(Debug, Subcommand)]
enum InvoicesCommand {
    /// Close the cycles that ended by --at (default now) into drafts and finalise drafts past
    /// their grace period, as the scheduler in `fatura serve` does. Running it twice changes
    /// nothing the second time.
    Run {
        /// RFC 3339 instant to run at.
        #[arg(long, value_name = "RFC3339")]
        at: Option<String>,
    },
    /// List invoices (tab-separated: id, number, status, customer, period start, total,
    /// currency).
    List {
        /// Only this customer.
        #[arg(long)]
        customer: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum PlansCommand {
    /// Create a plan from a JSON file (as POST /v1/plans) and print it.
    Create {
        /// The plan, e.g. {"id": "growth", "name": "Growth", "currency": "USD",
        /// "kind": "cost_plus", "margin": "0.9"}.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// List plans (tab-separated: id, version, currency, kind, name).
    List,
    /// Print a plan and its versions as JSON.
    Show {
        /// Plan id.
        id: String,
    },
    /// Add a version to a plan from a JSON file of the fields to change (as PATCH
    /// /v1/plans/ID) and print it.
    Update {
        /// Plan id.
        id: String,
        /// The changes, e.g. {"margin": "0.92", "effective_from": "2026-12-01T00:00:00Z"}.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Put a customer on a plan from an instant (default now).
    Assign {
        /// Customer id.
        #[arg(long)]
        customer: String,
        /// Plan id, or "default" for the default plan.
        #[arg(long)]
        plan: String,
        /// RFC 3339 instant the plan applies from (default now).
        #[arg(long, value_name = "RFC3339")]
        effective_from: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum FxCommand {
    /// Record the USD→CURRENCY rate of a day.
    Set {
        /// BRL or EUR.
        #[arg(long)]
        currency: String,
        /// The day it applies from (YYYY-MM-DD).
        #[arg(long)]
        date: String,
        /// Units of CURRENCY per 1 USD, e.g. 5.4321.
        #[arg(long)]
        rate: String,
    },
    /// List rates (tab-separated: currency, date, rate).
    List,
}

#[derive(Debug, Args)]
struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9090")]
    listen: String,
    /// Wire flavour: openai or openrouter (adds usage.cost, SSE comments).
    #[arg(long, default_value = "openai")]
    flavor: String,
    /// Answer every request with this HTTP status.
    #[arg(long)]
    fail_status: Option<u16>,
    /// Delay before answering, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay between stream chunks, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Completion tokens per answer.
    #[arg(long, default_value_t = 20)]
    completion_tokens: u64,
    /// Require this bearer key.
    #[arg(long)]
    api_key: Option<String>,
}

#[derive(Debug, Subcommand)]
enum CustomersCommand {
    /// Create a customer and print its id.
    Create {
        /// Display name.
        #[arg(long)]
        name: String,
        /// Billing currency: USD, BRL or EUR.
        #[arg(long, default_value = "USD")]
        currency: String,
        /// Id to use (default: generated cus_…).
        #[arg(long)]
        id: Option<String>,
        /// Prepaid: gateway calls reserve against the customer's wallet (default postpaid).
        #[arg(long)]
        prepaid: bool,
    },
    /// List customers (tab-separated: id, currency, created_at, name).
    List,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create an API key for a customer and print it (shown this once; stored hashed).
    Create {
        /// Customer id.
        #[arg(long)]
        customer: String,
    },
    /// Revoke an API key by its id.
    Revoke {
        /// Key id (key_…).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum PricesCommand {
    /// Import a catalog file as new price versions.
    Import {
        /// openrouter (GET /api/v1/models JSON) or litellm (LiteLLM price map).
        #[arg(long)]
        format: String,
        /// The catalog file.
        file: PathBuf,
        /// openrouter: provider name to record (default openrouter). litellm: import only
        /// entries whose litellm_provider is NAME.
        #[arg(long, value_name = "NAME")]
        provider: Option<String>,
        /// RFC 3339 instant from which the prices apply (default: now).
        #[arg(long, value_name = "RFC3339")]
        effective_from: Option<String>,
    },
}

fn init_tracing(default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("FATURA_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if std::env::var("FATURA_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn open(config: &Config) -> anyhow::Result<Arc<Fatura>> {
    let store = fatura_store::connect(&config.database_url, config.max_connections)
        .await
        .with_context(|| format!("cannot open database {}", redact_url(&config.database_url)))?;
    store
        .migrate()
        .await
        .context("cannot migrate the database")?;
    let margin = MarginRate::new(config.default_margin)?;
    Ok(Arc::new(Fatura::new(store, margin)))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received: finishing in-flight requests");
}

/// A bound server whose state is built as `fatura serve` builds it (payments when Stripe is
/// configured, the gateway and its metering writer when a gateway is given); run it with
/// [`Server::run`].
struct Server {
    state: fatura_server::AppState,
    listener: TcpListener,
    addr: std::net::SocketAddr,
    writer: Option<fatura_server::gateway::MeterWriter>,
    billing_every: Option<std::time::Duration>,
    database: String,
}

/// Binds `config.listen` and builds the server's state (`serve` and `demo` share it).
async fn build_server(
    config: &Config,
    admin_key: &str,
    fatura: Arc<Fatura>,
    gateway: Option<fatura_server::gateway::GatewayConfig>,
) -> anyhow::Result<Server> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let mut state = fatura_server::AppState::new(fatura.clone(), admin_key).with_billing(
        fatura_server::service::BillingPolicy {
            grace: config.billing_grace,
        },
    );
    if let Some(stripe) = config.stripe.clone() {
        state = state.with_payments(
            Arc::new(fatura_server::payments::StripeProcessor::new(
                &stripe.api_base,
                &stripe.api_key,
                &stripe.webhook_secret,
            )),
            stripe.policy,
        );
    }
    let mut writer = None;
    if let Some(gw) = gateway {
        let (meter, w) =
            fatura_server::gateway::Meter::start(fatura.clone(), &gw, state.metrics.clone());
        let gateway = fatura_server::gateway::Gateway::new(gw, meter, |v| std::env::var(v).ok())
            .map_err(anyhow::Error::msg)?;
        state = state.with_gateway(Arc::new(gateway));
        writer = Some(w);
    }
    Ok(Server {
        state,
        listener,
        addr,
        writer,
        billing_every: config.billing_every,
        database: redact_url(&config.database_url),
    })
}

impl Server {
    /// Serves until `shutdown` resolves (with the billing scheduler), then finishes
    /// in-flight requests and drains the metering queue.
    async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Server {
            state,
            listener,
            addr,
            writer,
            billing_every,
            database,
        } = self;
        tracing::info!(%addr, %database, gateway = writer.is_some(), "fatura listening");
        // Not the state: it holds the metering queue, which must close for the drain below.
        let scheduler = state.scheduler();
        let running = billing_every.map(|every| tokio::spawn(scheduler.clone().run(every)));
        fatura_server::serve(listener, state, shutdown).await?;
        if let Some(s) = running {
            s.abort();
            scheduler.release_lease().await;
        }
        if let Some(w) = writer {
            // The server (and with it every handle on the queue) is gone: drain it.
            w.finish().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

fn parse_instant(s: &str) -> anyhow::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .with_context(|| format!("--effective-from must be an RFC 3339 instant such as 2026-01-01T00:00:00Z, got {s:?}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let listen = match &cli.command {
        Command::Serve { listen } => listen.clone(),
        Command::Demo(args) => args.listen.clone(),
        _ => None,
    };
    let database = match &cli.command {
        // The demo writes demo data: only an explicit --database sends it elsewhere than
        // its own file (never to the database FATURA_DATABASE_URL or the config names).
        Command::Demo(_) => Some(
            cli.global
                .database
                .clone()
                .unwrap_or_else(|| demo::DEFAULT_DATABASE_URL.to_string()),
        ),
        _ => cli.global.database.clone(),
    };
    let config = Config::load(cli.global.config.as_deref(), listen, database)?;
    match cli.command {
        Command::Serve { .. } => {
            let admin_key = config.require_admin_key()?.to_string();
            let fatura = open(&config).await?;
            let server = build_server(&config, &admin_key, fatura, config.gateway.clone()).await?;
            server.run(shutdown_signal()).await?;
        }
        Command::Demo(args) => demo::run(&config, args).await?,
        Command::MockUpstream(m) => {
            use fatura_server::mock::{Flavor, MockConfig, serve_mock};
            let flavor = match m.flavor.as_str() {
                "openai" => Flavor::OpenAi,
                "openrouter" => Flavor::OpenRouter,
                other => anyhow::bail!("unknown flavor {other:?}: expected openai or openrouter"),
            };
            let mock = MockConfig {
                flavor,
                fail_status: m.fail_status,
                latency: std::time::Duration::from_millis(m.latency_ms),
                chunk_delay: std::time::Duration::from_millis(m.chunk_delay_ms),
                completion_tokens: m.completion_tokens,
                api_key: m.api_key,
                ..MockConfig::default()
            };
            let listener = TcpListener::bind(&m.listen)
                .await
                .with_context(|| format!("cannot listen on {}", m.listen))?;
            tracing::info!(addr = %listener.local_addr()?, "mock upstream listening");
            serve_mock(listener, mock, shutdown_signal()).await?;
        }
        Command::Migrate => {
            open(&config).await?;
            println!("database {} is migrated", redact_url(&config.database_url));
        }
        Command::Customers(CustomersCommand::Create {
            name,
            currency,
            id,
            prepaid,
        }) => {
            let currency: Currency = currency.parse()?;
            let fatura = open(&config).await?;
            let c = fatura
                .create_customer(
                    id.as_deref(),
                    &name,
                    currency,
                    fatura_server::service::Billing {
                        prepaid,
                        ..Default::default()
                    },
                    Utc::now(),
                )
                .await?;
            println!("{}", c.id);
        }
        Command::Customers(CustomersCommand::List) => {
            let fatura = open(&config).await?;
            for c in fatura.customers().await? {
                println!(
                    "{}\t{}\t{}\t{}",
                    c.id,
                    c.currency,
                    c.created_at.to_rfc3339(),
                    c.name
                );
            }
        }
        Command::Keys(KeysCommand::Create { customer }) => {
            let fatura = open(&config).await?;
            let k = fatura.create_api_key(&customer, Utc::now()).await?;
            eprintln!(
                "key {} for customer {} (shown once; fatura keeps only its hash):",
                k.record.id, customer
            );
            println!("{}", k.key);
        }
        Command::Keys(KeysCommand::Revoke { id }) => {
            let fatura = open(&config).await?;
            fatura.revoke_api_key(&id, Utc::now()).await?;
            println!("revoked {id}");
        }
        Command::Prices(PricesCommand::Import {
            format,
            file,
            provider,
            effective_from,
        }) => {
            let format: CatalogFormat = format.parse().map_err(anyhow::Error::msg)?;
            let effective_from = effective_from.as_deref().map(parse_instant).transpose()?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let fatura = open(&config).await?;
            let now = Utc::now();
            let r = fatura
                .import_prices(
                    format,
                    &bytes,
                    provider.as_deref(),
                    effective_from.unwrap_or(now),
                    now,
                )
                .await?;
            println!(
                "imported {} models effective from {}: {} new versions, {} unchanged, {} entries skipped, {} unpriced events now priced",
                r.models,
                r.effective_from.to_rfc3339(),
                r.created,
                r.unchanged,
                r.skipped.len(),
                r.events_priced
            );
        }
        Command::Plans(cmd) => plans(&config, cmd).await?,
        Command::Invoices(InvoicesCommand::Run { at }) => {
            let at = at.as_deref().map(parse_instant).transpose()?;
            let fatura = open(&config).await?;
            let r = fatura
                .run_billing(
                    at.unwrap_or_else(Utc::now),
                    fatura_server::service::BillingPolicy {
                        grace: config.billing_grace,
                    },
                )
                .await?;
            for inv in &r.finalized {
                println!(
                    "finalised {}\t{}\t{}\t{} {}",
                    inv.id,
                    inv.number.as_deref().unwrap_or(""),
                    inv.customer_id,
                    inv.total,
                    inv.currency
                );
            }
            println!(
                "{} drafts created, {} drafts refreshed, {} invoices finalised",
                r.drafted,
                r.refreshed,
                r.finalized.len()
            );
            for f in &r.failed {
                eprintln!("not billed\t{}\t{}\t{}", f.customer_id, f.code, f.message);
            }
            if !r.failed.is_empty() {
                anyhow::bail!(
                    "{} customers could not be billed (the others were); see above",
                    r.failed.len()
                );
            }
        }
        Command::Invoices(InvoicesCommand::List { customer }) => {
            let fatura = open(&config).await?;
            for inv in fatura.invoices(customer.as_deref(), None).await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    inv.id,
                    inv.number.as_deref().unwrap_or("-"),
                    inv.status,
                    inv.customer_id,
                    inv.period_start.to_rfc3339(),
                    inv.total,
                    inv.currency
                );
            }
        }
        Command::FxRates(FxCommand::Set {
            currency,
            date,
            rate,
        }) => {
            let currency: Currency = currency.parse()?;
            let date: chrono::NaiveDate = date
                .parse()
                .with_context(|| format!("--date must be YYYY-MM-DD, got {date:?}"))?;
            let rate: rust_decimal::Decimal = rate.trim().parse().with_context(|| {
                format!("--rate must be a decimal such as 5.4321, got {rate:?}")
            })?;
            let fatura = open(&config).await?;
            let r = fatura.put_fx_rate(currency, date, rate, Utc::now()).await?;
            println!("{}\t{}\t{}", r.currency, r.date, r.rate);
        }
        Command::FxRates(FxCommand::List) => {
            let fatura = open(&config).await?;
            for r in fatura.fx_rates(None).await? {
                println!("{}\t{}\t{}", r.currency, r.date, r.rate);
            }
        }
    }
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(file: &std::path::Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a valid plan body", file.display()))
}

async fn plans(config: &Config, cmd: PlansCommand) -> anyhow::Result<()> {
    use fatura_server::plans::{create_plan_with, plan_out, update_plan_with};
    let now = Utc::now();
    match cmd {
        PlansCommand::Create { file } => {
            let body = read_json(&file)?;
            let fatura = open(config).await?;
            let out = create_plan_with(&fatura, body, now).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        PlansCommand::Update { id, file } => {
            let body = read_json(&file)?;
            let fatura = open(config).await?;
            let out = update_plan_with(&fatura, &id, body, now).await?;
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        PlansCommand::List => {
            let fatura = open(config).await?;
            for p in fatura.plans(now).await? {
                let out = plan_out(p);
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    out.id, out.version, out.currency, out.kind, out.name
                );
            }
        }
        PlansCommand::Show { id } => {
            let fatura = open(config).await?;
            let out = plan_out(fatura.plan(&id, now).await?);
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        PlansCommand::Assign {
            customer,
            plan,
            effective_from,
        } => {
            let at = effective_from.as_deref().map(parse_instant).transpose()?;
            let fatura = open(config).await?;
            let plan_id = (plan != "default").then_some(plan.as_str());
            fatura
                .assign_plan(&customer, plan_id, at.unwrap_or(now), now)
                .await?;
            println!(
                "customer {customer} is on plan {plan} from {}",
                at.unwrap_or(now).to_rfc3339()
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(match cli.command {
        // The demo's traffic fails on purpose now and then: no error line per failed call.
        Command::Demo(_) => "info,sqlx=warn,tower_http::trace::on_failure=off",
        _ => "info,sqlx=warn",
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
