//! Command-line arguments (clap derive). Parsing only: no engine logic here.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use marmoset_storage::Overwrite;

#[derive(Parser, Debug)]
#[command(
    name = "marmoset",
    version,
    about = "Deduplicating, encrypted backups with fast restore"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Repository location: a directory path (optionally `local:PATH`).
    #[arg(short = 'r', long, env = "MARMOSET_REPOSITORY", global = true)]
    pub repo: Option<String>,
    /// Read the repository password from this file (first line).
    #[arg(long, env = "MARMOSET_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// S3: parallel uploads.
    #[arg(
        long,
        env = "MARMOSET_S3_CONNECTIONS",
        global = true,
        default_value_t = 8
    )]
    pub s3_connections: usize,
    /// S3: attempts per request, the first included, before an error is
    /// given up on (backoff with jitter between them, from 0.4 s doubling
    /// up to 20 s; 10 ride out about a minute and a half of outage).
    #[arg(
        long,
        env = "MARMOSET_S3_RETRIES",
        global = true,
        default_value_t = 10,
        value_parser = clap::value_parser!(u32).range(1..=100)
    )]
    pub s3_retries: u32,
    /// S3: region (default: from the endpoint host, AWS_REGION, or us-east-1).
    #[arg(long, env = "MARMOSET_S3_REGION", global = true)]
    pub s3_region: Option<String>,
    /// S3: path-style addressing (host/bucket/key), needed by most S3-compatibles.
    #[arg(long, env = "MARMOSET_S3_PATH_STYLE", global = true, default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_path_style: bool,
    /// S3: checksum headers: when_required (compatible) or when_supported (AWS default).
    #[arg(
        long,
        env = "MARMOSET_S3_CHECKSUMS",
        global = true,
        default_value = "when_required"
    )]
    pub s3_checksums: String,
    /// S3: objects above this many MiB are uploaded in parallel parts.
    #[arg(
        long,
        env = "MARMOSET_S3_MULTIPART_MIB",
        global = true,
        default_value_t = 64
    )]
    pub s3_multipart_mib: usize,
    /// Limit upload bandwidth, in KiB/s.
    #[arg(long, env = "MARMOSET_LIMIT_UPLOAD", global = true)]
    pub limit_upload: Option<u64>,
    /// Limit download bandwidth, in KiB/s.
    #[arg(long, env = "MARMOSET_LIMIT_DOWNLOAD", global = true)]
    pub limit_download: Option<u64>,
    /// Machine-readable JSON on stdout instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Root of the local index caches (default ~/.cache/marmoset).
    #[arg(long, env = "MARMOSET_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// More log output (-v info, -vv debug); logs go to stderr.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// No progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new repository.
    Init(InitArgs),
    /// Back up files and directories into a new snapshot.
    Backup(BackupArgs),
    /// List snapshots.
    Snapshots(SnapshotsArgs),
    /// List files of a snapshot: SNAP[:path].
    Ls(LsArgs),
    /// Restore a snapshot, or a path in it, into a directory.
    Restore(RestoreArgs),
    /// Print repository objects: config, snapshot ID, tree SNAP[:path], index NAME, pack ID, keys.
    Cat(CatArgs),
    /// Repository statistics (and one snapshot's with --snapshot).
    Stats(StatsArgs),
    /// Copy snapshots from another repository (--from-repo) into this one, re-encrypted.
    Copy(CopyArgs),
    /// Backup sets: the node agent's scheduled runs across all nodes (like `velero backup get`).
    Sets {
        #[command(subcommand)]
        command: Option<SetsCommand>,
    },
    /// Remove snapshots according to a retention policy (data goes at the next `maintain --full`).
    Forget(ForgetArgs),
    /// Compact the index (quick) or collect garbage (--full); safe while backups run.
    Maintain(MaintainArgs),
    /// Check the repository's structure, and with --read-data every blob.
    Check(CheckArgs),
    /// Fail when the latest snapshot of a source is too old; optionally test-restore it.
    Verify(VerifyArgs),
    /// Mount every snapshot read-only with FUSE (foreground; Ctrl-C unmounts).
    Mount(MountArgs),
    /// Kubernetes node agent: back up this node's PersistentVolumes on schedule.
    Agent(AgentArgs),
    /// Kubernetes restores: a backup set back into the cluster (like `velero restore`), the weekly test restore.
    K8s {
        #[command(subcommand)]
        command: K8sCommand,
    },
    /// Show added, removed and changed paths between two snapshots.
    Diff(DiffArgs),
    /// Find files by name (or path) glob across snapshots.
    Find(FindArgs),
    /// Manage keys (passwords) of the repository.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Repair repository metadata.
    Repair {
        #[command(subcommand)]
        command: RepairCommand,
    },
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Average chunk size in bytes (min = avg/4, max = avg*4); default 1 MiB.
    #[arg(long)]
    pub chunk_size: Option<u32>,
    /// Target pack size in MiB (default 16).
    #[arg(long)]
    pub pack_size_mib: Option<u32>,
    /// zstd level for new data, 0 = off (default 3).
    #[arg(long)]
    pub compression: Option<i32>,
    /// Take the chunker parameters and secret chunker seed of the
    /// repository given by --from-repo, so `marmoset copy` from it cuts
    /// the same chunks and deduplicates against what this one holds.
    #[arg(long, requires = "from_repo", conflicts_with = "chunk_size")]
    pub copy_chunker_params: bool,
    #[command(flatten)]
    pub from: FromRepo,
}

/// The other repository of `copy` (and of `init --copy-chunker-params`).
/// For an S3 one the --s3-* flags apply too; its credentials come from
/// MARMOSET_FROM_AWS_ACCESS_KEY_ID / MARMOSET_FROM_AWS_SECRET_ACCESS_KEY
/// when set (another account or provider), else from the usual AWS
/// variables.
#[derive(Args, Debug, Clone)]
pub struct FromRepo {
    /// The repository to copy from (a directory or s3:URL, as --repo).
    #[arg(long, env = "MARMOSET_FROM_REPOSITORY")]
    pub from_repo: Option<String>,
    /// Its password file (first line); else MARMOSET_FROM_PASSWORD or a prompt.
    #[arg(long, env = "MARMOSET_FROM_PASSWORD_FILE")]
    pub from_password_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    #[command(flatten)]
    pub from: FromRepo,
    /// Snapshots to copy: ids, unique id prefixes or `latest`; default every
    /// snapshot the filters select.
    pub snapshots: Vec<String>,
    /// Only snapshots of this source (repeatable).
    #[arg(long = "source")]
    pub sources: Vec<String>,
    /// Only snapshots of this host (repeatable).
    #[arg(long = "host")]
    pub hosts: Vec<String>,
    /// Only snapshots with this tag; given several times, with all of them.
    /// A backup set of the node agent: --tag set=NAME.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Say what would be copied; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Threads reading and re-encrypting blobs (default: cores; 4 or more
    /// for a remote source).
    #[arg(long)]
    pub threads: Option<usize>,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Files and directories to back up.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Source name recorded in the snapshot (default host:/path), e.g. namespace/pvc.
    #[arg(long)]
    pub source: Option<String>,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Exclude paths matching a glob (repeatable); without `/` it matches names.
    #[arg(long = "exclude", short = 'e')]
    pub excludes: Vec<String>,
    /// Read all files even if unchanged since the last backup.
    #[arg(long)]
    pub force: bool,
    /// Worker threads (default: number of cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Record this host name.
    #[arg(long)]
    pub host: Option<String>,
}

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only snapshots of this source.
    #[arg(long)]
    pub source: Option<String>,
    /// Only snapshots with this tag.
    #[arg(long)]
    pub tag: Option<String>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// SNAP[:path]; SNAP is an id prefix or `latest`.
    pub target: String,
    /// List everything below the path.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    /// Long listing: mode, owner, size, time.
    #[arg(short, long)]
    pub long: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// SNAP[:path]; SNAP is an id prefix or `latest`.
    pub snapshot: String,
    /// With `latest`: the newest snapshot of this source (e.g. `default/redis-pvc`).
    #[arg(long)]
    pub source: Option<String>,
    /// With `latest`: the newest snapshot carrying this tag (repeatable, e.g. `schedule=weekly`).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Directory to restore into (created if missing).
    #[arg(long, short = 't')]
    pub target: PathBuf,
    /// Restore only paths matching a glob (repeatable).
    #[arg(long = "include", short = 'i')]
    pub includes: Vec<String>,
    /// Skip paths matching a glob (repeatable).
    #[arg(long = "exclude", short = 'e')]
    pub excludes: Vec<String>,
    /// Packs downloaded in parallel (default: --s3-connections for S3,
    /// 2 × cores for a local repository). Decoding and writing use every
    /// core whatever this is.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Files already in the target: `always` replace them, `if-changed`
    /// keeps those whose size and mtime match and fetches only the
    /// differing chunks of the others (an interrupted restore resumes),
    /// `never` keeps them.
    #[arg(long, default_value = "always", value_parser = parse_overwrite)]
    pub overwrite: Overwrite,
    /// Remove files and folders of restored directories that the snapshot
    /// does not have, so the target ends up exactly as backed up.
    #[arg(long)]
    pub delete: bool,
    /// Do not restore ownership, even as root: everything belongs to the
    /// user running the restore.
    #[arg(long)]
    pub no_owner: bool,
    /// Create no device files or fifos (reported as skipped) and drop
    /// setuid, setgid and sticky bits.
    #[arg(long)]
    pub no_special: bool,
    /// Restore no extended attributes (by default `user.*` ones, and as
    /// root all of them, `security.*` included).
    #[arg(long)]
    pub no_xattrs: bool,
}

fn parse_overwrite(s: &str) -> Result<Overwrite, String> {
    s.parse()
}

#[derive(Args, Debug)]
pub struct CatArgs {
    /// config | snapshot | tree | index | pack | keys | blob
    pub kind: String,
    pub id: Option<String>,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Report one snapshot instead of the whole repository.
    #[arg(long)]
    pub snapshot: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Add a key; its password comes from --new-password-file or a prompt.
    Add(NewPassword),
    /// List keys.
    List,
    /// Remove a key by id prefix (never the last one).
    Remove { id: String },
    /// Change the password of the key in use (data is not rewritten).
    Passwd(NewPassword),
}

#[derive(Args, Debug)]
pub struct NewPassword {
    #[arg(long, env = "MARMOSET_NEW_PASSWORD_FILE")]
    pub new_password_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum SetsCommand {
    /// One set: every volume with its node, phase, snapshot, bytes, duration and error.
    Describe {
        /// The set's name, e.g. daily-20260208020000.
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum K8sCommand {
    /// Restore a backup set's objects and volumes (like `velero restore create`); `restore get`, `restore describe NAME`.
    Restore(K8sRestoreArgs),
    /// The init container of a restored pod: waits until the agent has restored the pod's volumes.
    RestoreWait {
        /// The restore's name.
        #[arg(long)]
        restore: String,
        /// The wait volume, where the agent leaves `done` or `failed`.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "24h")]
        timeout: String,
    },
    /// Test restore: the newest completed set of a schedule, younger than --max-age, restored into a temporary namespace.
    Verify(K8sVerifyArgs),
}

#[derive(Args, Debug, Clone)]
pub struct K8sCluster {
    /// The agent's namespace: restore records live there.
    #[arg(long, env = "MARMOSET_AGENT_NAMESPACE", default_value = "marmoset")]
    pub agent_namespace: String,
    /// Image of the restore-wait container (default: the agent DaemonSet's image).
    #[arg(long, env = "MARMOSET_IMAGE")]
    pub image: Option<String>,
    /// How often to look at the restore's progress.
    #[arg(long, default_value = "5s", hide = true)]
    pub poll: String,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct K8sRestoreArgs {
    #[command(subcommand)]
    pub command: Option<K8sRestoreCommand>,
    /// The backup set to restore (`marmoset sets`), e.g. daily-20260208020000.
    #[arg(long)]
    pub from: Option<String>,
    /// Namespaces to restore (default: all in the set).
    #[arg(long, value_delimiter = ',')]
    pub include_namespaces: Vec<String>,
    /// Restore namespaces under other names: `default:restored-default,a:b`.
    #[arg(long)]
    pub namespace_mappings: Option<String>,
    /// Only objects with these labels: `app=x,tier!=db,team,!legacy`.
    #[arg(long, short = 'l')]
    pub selector: Option<String>,
    /// Only these resource types (`persistentvolumeclaims,deployments.apps`).
    #[arg(long, value_delimiter = ',')]
    pub include_resources: Vec<String>,
    #[arg(long, value_delimiter = ',')]
    pub exclude_resources: Vec<String>,
    /// Create the objects only: restored PVCs start empty.
    #[arg(long)]
    pub no_volumes: bool,
    /// Wait until every volume is restored (then remove the helper pods).
    #[arg(long)]
    pub wait: bool,
    #[arg(long, default_value = "6h")]
    pub timeout: String,
    /// Print what would be created; create nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub cluster: K8sCluster,
}

#[derive(Subcommand, Debug)]
pub enum K8sRestoreCommand {
    /// Every restore recorded, with its phase.
    Get {
        #[command(flatten)]
        cluster: K8sCluster,
    },
    /// One restore: objects created, existing and failed; each volume's node, phase, bytes and error.
    Describe {
        name: String,
        #[command(flatten)]
        cluster: K8sCluster,
    },
}

#[derive(Args, Debug)]
pub struct K8sVerifyArgs {
    #[arg(long, default_value = "daily")]
    pub schedule: String,
    /// The namespace restored.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Fail when the newest completed set is older.
    #[arg(long, default_value = "48h")]
    pub max_age: String,
    /// Default: marmoset-verify-<date>.
    #[arg(long)]
    pub target_namespace: Option<String>,
    #[arg(long, default_value = "2h")]
    pub timeout: String,
    /// Leave the restored namespace and record for inspection.
    #[arg(long)]
    pub keep: bool,
    #[command(flatten)]
    pub cluster: K8sCluster,
}

#[derive(Subcommand, Debug)]
pub enum RepairCommand {
    /// Rebuild the index files from the pack trailers.
    Index,
    /// Rewrite snapshots without their unreadable parts (tagged `repaired`).
    Snapshots {
        /// Only report what would be changed.
        #[arg(long)]
        dry_run: bool,
        /// Also read and authenticate every chunk, dropping files whose
        /// data is damaged in place (not only those with missing blobs).
        #[arg(long)]
        read_data: bool,
    },
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    #[arg(long)]
    pub keep_last: Option<u32>,
    #[arg(long)]
    pub keep_hourly: Option<u32>,
    #[arg(long)]
    pub keep_daily: Option<u32>,
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    #[arg(long)]
    pub keep_yearly: Option<u32>,
    /// Keep snapshots within this span of the group's newest (e.g. 7d).
    #[arg(long)]
    pub keep_within: Option<String>,
    /// Keep snapshots younger than this, from now (e.g. 168h), like Velero's TTL.
    #[arg(long)]
    pub ttl: Option<String>,
    /// Keep snapshots with this tag (repeatable).
    #[arg(long = "keep-tag")]
    pub keep_tags: Vec<String>,
    /// Only consider snapshots of this source (repeatable).
    #[arg(long = "source")]
    pub sources: Vec<String>,
    /// Only consider snapshots with this tag (repeatable; all must match).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Group by: source, tags, or source,tags.
    #[arg(long, default_value = "source")]
    pub group_by: String,
    /// Compute buckets (days, weeks) in UTC instead of local time.
    #[arg(long)]
    pub utc: bool,
    /// Print what would be kept and removed, and why; change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct MaintainArgs {
    /// Mark and sweep: plan deletion of unreferenced data, rewrite sparse packs.
    #[arg(long)]
    pub full: bool,
    /// Minimum age of a plan before its packs are deleted (e.g. 1h, 0s in tests).
    #[arg(long, default_value = "1h")]
    pub safety_margin: String,
    /// Rewrite packs whose unused fraction exceeds this.
    #[arg(long, default_value_t = 0.3)]
    pub max_unused: f64,
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Read and authenticate every blob of every pack.
    #[arg(long)]
    pub read_data: bool,
    /// Read a subset of packs: `10%` (random) or `n/m` (rotation).
    #[arg(long)]
    pub read_data_subset: Option<String>,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Fail when the latest snapshot is older than this.
    #[arg(long, default_value = "48h")]
    pub max_age: String,
    /// Restore the latest snapshot to a temporary directory and check every byte.
    #[arg(long)]
    pub restore_test: bool,
    /// Sources to verify (repeatable); default all.
    #[arg(long = "source")]
    pub sources: Vec<String>,
    /// Directory for the temporary restore.
    #[arg(long)]
    pub temp_dir: Option<PathBuf>,
    /// Read and check every chunk of the latest snapshots without writing
    /// them anywhere (no scratch space needed).
    #[arg(long, conflicts_with_all = ["restore_test", "temp_dir"])]
    pub stream: bool,
    /// Verify only the newest backup set: the snapshots carrying the
    /// greatest tag that starts with this prefix (the node agent tags its
    /// runs `set=<schedule>-<YYYYMMDDhhmmss>`), e.g. `set=daily-`.
    #[arg(long, value_name = "PREFIX")]
    pub newest_tag: Option<String>,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Empty directory to mount on.
    pub mountpoint: PathBuf,
    /// Let other users access the mount (needs user_allow_other in /etc/fuse.conf for non-root).
    #[arg(long)]
    pub allow_other: bool,
    /// Memory for decrypted chunks, in MiB.
    #[arg(long, default_value_t = 256)]
    pub cache_mib: usize,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    pub from: String,
    pub to: String,
    /// Also list metadata-only changes.
    #[arg(long)]
    pub metadata: bool,
}

#[derive(Args, Debug)]
pub struct FindArgs {
    /// Glob; matched against names, or against paths when it contains `/`.
    pub pattern: String,
    /// Only these snapshots (repeatable; id prefix or latest).
    #[arg(long = "snapshot")]
    pub snapshots: Vec<String>,
    /// Only snapshots of this source.
    #[arg(long)]
    pub source: Option<String>,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// Agent configuration (YAML; usually a mounted ConfigMap).
    #[arg(
        long,
        env = "MARMOSET_AGENT_CONFIG",
        default_value = "/etc/marmoset/agent.yaml"
    )]
    pub config: PathBuf,
    /// This node's name (from the downward API in the DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Run this schedule once now and exit (exit code 1 when a volume failed).
    #[arg(long, value_name = "SCHEDULE")]
    pub once: Option<String>,
    /// Print the volumes this node would back up, and why others are skipped.
    #[arg(long)]
    pub plan: bool,
}

/// Splits a `SNAP[:path]` argument (`ls`, `restore`, `cat tree`) into the
/// snapshot spec and the path, which is empty when not given.
pub fn split_target(t: &str) -> (&str, &str) {
    match t.split_once(':') {
        Some((s, p)) => (s, p),
        None => (t, ""),
    }
}
