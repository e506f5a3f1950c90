//! The clients every function builds once per cold start, from [`Config`]:
//! the table, the Dedalus client and the provisioning trigger. Secrets named
//! by ARN are fetched here, once.

use crate::config::{Config, KeySource, Secret};
use crate::dedalus::{self, ApiKey, ClientConfig};
use crate::provision::{Bootstrap, LambdaTrigger, MachineSpec, ProvisionSettings, Provisioner};
use crate::store::DynamoStore;

/// A start-up failure, naming what could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A secret could not be read from Secrets Manager.
    #[error("cannot read secret {arn}: {source}")]
    Secret {
        /// The secret's ARN or name.
        arn: String,
        /// The SDK error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The Dedalus client could not be built.
    #[error("cannot build the Dedalus client: {0}")]
    Dedalus(#[from] dedalus::Error),
}

/// The clients of one cold start.
#[derive(Clone)]
pub struct App {
    /// Configuration as read at start, with secrets named by ARN resolved.
    pub config: Config,
    /// The user→machine table.
    pub store: DynamoStore,
    /// The Dedalus Machines API client.
    pub dedalus: dedalus::Client,
    /// The AWS SDK configuration (region, endpoints, credentials).
    pub aws: aws_config::SdkConfig,
    /// The lifecycle journal (off without `JOURNAL_TABLE`).
    pub journal: crate::journal::Journal,
}

impl App {
    /// Read the environment and build every client once.
    pub async fn from_env() -> Result<Self, StartError> {
        let config = Config::from_env()?;
        Self::build(config).await
    }

    /// Build every client once from `config`.
    pub async fn build(config: Config) -> Result<Self, StartError> {
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let dedalus_key = match &config.dedalus_key {
            KeySource::Env(secret) => secret.clone(),
            KeySource::SecretArn(arn) => fetch_secret(&aws, arn).await?,
        };
        let mut config = config;
        if config.llm_api_key.is_none() {
            if let Some(arn) = config.llm_api_key_secret_arn.clone() {
                config.llm_api_key = Some(fetch_secret(&aws, &arn).await?);
            }
        }
        let dedalus = dedalus::Client::new(ClientConfig::new(
            config.dedalus_base_url.clone(),
            ApiKey::new(dedalus_key.expose()),
        ))?;
        let store = DynamoStore::new(
            aws_sdk_dynamodb::Client::new(&aws),
            config.table_name.clone(),
        )
        .with_awake_shards(crate::store::ShardLayout::from_env()?.shards);
        let journal = journal_of(&config, &aws);
        Ok(App {
            config,
            store,
            dedalus,
            aws,
            journal,
        })
    }

    /// Provisioning settings from the configuration.
    pub fn provision_settings(&self) -> ProvisionSettings {
        let c = &self.config;
        ProvisionSettings::new(
            MachineSpec {
                vcpu: c.machine_vcpu,
                memory_mib: c.machine_memory_mib,
                storage_gib: c.machine_storage_gib,
                autosleep: c.machine_autosleep.clone(),
            },
            Bootstrap::new(c.bootstrap_script.clone(), c.bootstrap_check.clone()),
        )
    }

    /// The provisioning service, starting workers by invoking
    /// `PROVISION_FUNCTION` asynchronously (`None` if it is not configured).
    pub fn provisioner(&self) -> Option<Provisioner<DynamoStore, LambdaTrigger>> {
        let function = self.config.provision_function.clone()?;
        let trigger = LambdaTrigger::new(
            aws_sdk_lambda::Client::new(&self.aws),
            function,
            self.config.provision_invoke_detached,
        );
        Some(
            Provisioner::new(
                self.store.clone(),
                self.dedalus.clone(),
                trigger,
                self.provision_settings(),
            )
            .with_journal(self.journal.clone()),
        )
    }

    /// The sweeper over this table and Dedalus client, recording in the
    /// journal (its pre-sleep hook bounded by `HOOK_TIMEOUT`).
    pub fn sweeper(
        &self,
        settings: crate::sweep::SweepSettings,
    ) -> crate::sweep::Sweeper<DynamoStore> {
        crate::sweep::Sweeper::new(
            std::sync::Arc::new(self.store.clone()),
            &self.dedalus,
            settings,
        )
        .with_journal(self.journal.clone(), self.config.hook_timeout)
    }

    /// Say loudly at start when `AUTH_MODE=none` leaves the routes open.
    pub fn warn_if_open(&self) {
        if self.config.auth_mode == crate::api::AuthMode::None {
            tracing::warn!(
                "AUTH_MODE=none: every caller may act for every user; use only for local runs"
            );
        }
    }
}

/// The journal `JOURNAL_TABLE` names (off when unset).
fn journal_of(config: &Config, aws: &aws_config::SdkConfig) -> crate::journal::Journal {
    match &config.journal_table {
        Some(table) => crate::journal::Journal::new(
            std::sync::Arc::new(crate::journal::DynamoJournal::new(
                aws_sdk_dynamodb::Client::new(aws),
                table.clone(),
            )),
            std::time::Duration::from_secs(u64::from(config.journal_ttl_days) * 86_400),
        ),
        None => crate::journal::Journal::off(),
    }
}

async fn fetch_secret(aws: &aws_config::SdkConfig, arn: &str) -> Result<Secret, StartError> {
    let client = aws_sdk_secretsmanager::Client::new(aws);
    let out = client
        .get_secret_value()
        .secret_id(arn)
        .send()
        .await
        .map_err(|e| StartError::Secret {
            arn: arn.to_string(),
            source: Box::new(aws_sdk_secretsmanager::Error::from(e)),
        })?;
    match out.secret_string() {
        Some(s) if !s.trim().is_empty() => Ok(Secret::new(s.trim())),
        _ => Err(StartError::Secret {
            arn: arn.to_string(),
            source: "the secret has no string value".into(),
        }),
    }
}
