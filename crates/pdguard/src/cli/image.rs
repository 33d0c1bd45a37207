//! `pdguard image seal|unseal|verify|inspect PATH`: the engine on one image, offline.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use pdguard_core::keys::MasterKey;
use pdguard_core::{Phase, PlacementKind, Profile, SealRecord};
use pdguard_engine::jobs::{self, JobReport, SealOptions};
use pdguard_engine::keyfile::{self, KeyFileError};
use pdguard_engine::store::file::{default_record_path, is_block_device, ImageStorage};
use serde_json::json;

use super::progress::Bar;
use super::{Cli, CliError};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Seal an image in place: every sector moved to a pseudo-random place through a thin disk.
    Seal(SealArgs),
    /// Restore a sealed image bit-exact and check it against the seal-time digest; also
    /// finishes an instant reclaim that no daemon serves any more (phase migrating).
    Unseal(UnsealArgs),
    /// Check a sealed image against its record without unsealing it (exit 3 on mismatch);
    /// an image being reclaimed (phase migrating), region by region.
    Verify(VerifyArgs),
    /// Print the seal record of an image (never a secret).
    Inspect(Located),
    /// Crypto-erase a sealed image (secure profile): destroy its wrapped key for good.
    Shred(ShredArgs),
    /// Bring a seal record of an older version (1 or 2: no MAC, the wrapped key inside) to
    /// the current one, with a key slot and a MAC; needs the master key (secure profile).
    Migrate(MigrateArgs),
}

/// The image and its record: all that `inspect`, `verify` and `shred` touch (they use no
/// thin disk).
#[derive(Debug, Args)]
pub struct Located {
    /// Raw disk image file or block device.
    pub path: PathBuf,
    /// Seal record (default: PATH.pdguard; required for a block device).
    #[arg(long)]
    pub record: Option<PathBuf>,
}

impl Located {
    /// As a job target: no thin-disk directory, and the key as given.
    pub fn target(&self, key_file: Option<&Path>) -> Target {
        Target {
            path: self.path.clone(),
            record: self.record.clone(),
            thin_dir: None,
            key_file: key_file.map(Path::to_path_buf),
        }
    }
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub located: Located,
    /// Also check that this master key opens the seal (secure profile); without it (and
    /// without $PDGUARD_KEY_FILE) only the sealed bytes are checked, which needs no key.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub located: Located,
    /// Master key file (default: $PDGUARD_KEY_FILE, then /etc/pdguard/master.key).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ShredArgs {
    #[command(flatten)]
    pub located: Located,
    /// Master key file, to authenticate the record before destroying (default:
    /// $PDGUARD_KEY_FILE, then /etc/pdguard/master.key); without one the shred still runs.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Confirm: the data becomes unrecoverable, even with the master key.
    #[arg(long)]
    pub yes: bool,
}

/// The image and where its record and thin disk live.
#[derive(Debug, Args)]
pub struct Target {
    /// Raw disk image file or block device.
    pub path: PathBuf,
    /// Seal record (default: PATH.pdguard; required for a block device).
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Directory for the thin disk, the scratch file of a job; needs free space up to the
    /// image's size (default: the record's directory).
    #[arg(long)]
    pub thin_dir: Option<PathBuf>,
    /// Master key file, for the secure profile (default: $PDGUARD_KEY_FILE, then
    /// /etc/pdguard/master.key).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UnsealArgs {
    #[command(flatten)]
    pub target: Target,
    /// Recovery of a damaged seal: write the best-effort plaintext to --output even when
    /// the digests do not match (exit 3 then). The sealed image and its record are left
    /// as they are.
    #[arg(long, requires = "output")]
    pub force: bool,
    /// With --force: a new file for the plaintext (never overwritten; mode 0600).
    #[arg(long, value_name = "FILE", requires = "force")]
    pub output: Option<PathBuf>,
    /// Unseal the way an instant reclaim does, region by region: the sealed image is
    /// copied to PATH.pdguard.evacuation beside the record, then each region is moved to
    /// its plain place, checked against the seal's region digest tree, and recorded in
    /// the moved map PATH.pdguard.moved. (A record already in phase migrating, a reclaim
    /// whose daemon stopped, is finished this way without the flag.)
    #[arg(long, conflicts_with_all = ["force", "thin_dir"])]
    pub instant: bool,
    #[command(flatten)]
    pub memory: MemoryArg,
}

/// Memory budget of the passes.
#[derive(Debug, Args)]
pub struct MemoryArg {
    /// Memory for buffers, e.g. 64M, 1.5G or 1GiB (K, M, G, T: powers of 1024). Changes
    /// speed only, never the result; disks larger than it work.
    #[arg(long = "memory", value_name = "SIZE", default_value = "256M", value_parser = super::size::positive)]
    pub bytes: u64,
}

/// The values of `--strategy`, with what each does.
pub fn strategy_values() -> clap::builder::PossibleValuesParser {
    use clap::builder::PossibleValue;
    debug_assert_eq!(
        pdguard_engine::jobs::strategy::STRATEGIES,
        ["window", "direct"]
    );
    clap::builder::PossibleValuesParser::new([
        PossibleValue::new("window")
            .help("Large sequential I/O through per-window buffers; the fast default"),
        PossibleValue::new("direct")
            .help("The patent's literal per-sector writes at the drawn offsets; slow"),
    ])
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ProfileArg {
    /// Keyed placement and AES-256-XTS per sector with a wrapped per-seal key.
    Secure,
    /// The patent's literal method: hides sector order, not contents.
    Patent,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PlacementArg {
    /// Seeded PRNG, repeated draws skipped ([039]).
    Patent,
    /// Keyed Feistel permutation with cycle-walking; O(1) memory.
    Feistel,
}

#[derive(Debug, Args)]
pub struct SealArgs {
    #[command(flatten)]
    pub target: Target,
    /// What the seal hides (README: "What each profile hides").
    #[arg(long, value_enum, default_value = "secure")]
    pub profile: ProfileArg,
    /// Bytes per sector: a power of two from 512 to 65536 that divides the image size.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = super::values::sector_size)]
    pub sector_size: u32,
    /// Bytes per word of the [040] seed: a power of two up to the sector size.
    #[arg(long, value_name = "BYTES", default_value_t = 32, value_parser = super::values::word_length)]
    pub word_length: u32,
    /// Thin disk this many percent larger than the image (more empty slots), 0 to 1000.
    #[arg(long = "thin-slack", value_name = "PCT", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub thin_slack: u32,
    /// Placement of sectors on the thin disk (default: feistel in the secure profile,
    /// patent in the patent profile).
    #[arg(long, value_enum)]
    pub placement: Option<PlacementArg>,
    /// How bytes are moved; never changes the sealed image. A resumed job uses the strategy
    /// its record names.
    #[arg(long, default_value = "window", value_parser = strategy_values())]
    pub strategy: String,
    /// Secure profile: leave sectors of zeros unencrypted, so that a sparse image stays
    /// sparse and seals in proportion to its data. Reveals how many sectors are zeros (not
    /// which: they are moved like the rest). The patent profile always keeps holes.
    #[arg(long)]
    pub keep_holes: bool,
    #[command(flatten)]
    pub memory: MemoryArg,
}

pub fn run(cmd: &ImageCommand, cli: &Cli) -> Result<(), CliError> {
    match cmd {
        ImageCommand::Seal(a) => seal(a, cli),
        ImageCommand::Unseal(a) => match &a.output {
            Some(out) if a.force => super::rescue::run(&a.target, out, a.memory.bytes, cli),
            _ => unseal(&a.target, a.instant, a.memory.bytes, cli),
        },
        ImageCommand::Verify(a) => verify(&a.located.target(a.key_file.as_deref()), cli),
        ImageCommand::Inspect(l) => inspect(&l.target(None), cli),
        ImageCommand::Shred(a) => shred(a, cli),
        ImageCommand::Migrate(a) => migrate(a, cli),
    }
}

/// The master key for a secure-profile job on an existing seal: the key is required, and a
/// missing file is reported as such (making a new key would not help).
pub(super) fn key_for(t: &Target, rec: &SealRecord) -> Result<Option<MasterKey>, CliError> {
    if rec.profile != Profile::Secure || rec.phase.is_shred() {
        return Ok(None);
    }
    let path = keyfile::locate(t.key_file.as_deref());
    match keyfile::load(&path) {
        Ok(k) => Ok(Some(k)),
        Err(KeyFileError::Missing { path }) => Err(CliError::Input(format!(
            "{} was sealed with the secure profile and needs its master key (id {}), but there is no key file at {path}; pass --key-file FILE or set PDGUARD_KEY_FILE",
            t.path.display(),
            rec.master_key_id().unwrap_or("?"),
        ))),
        Err(e) => Err(e.into()),
    }
}

/// Check the target before anything opens it, and build its storage.
pub(super) fn storage(t: &Target) -> Result<ImageStorage, CliError> {
    let p = &t.path;
    let meta = std::fs::metadata(p).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CliError::Input(format!(
            "image {} does not exist; check the path",
            p.display()
        )),
        _ => CliError::Io {
            what: format!("cannot read image {}", p.display()),
            source: e,
        },
    })?;
    if meta.is_dir() {
        return Err(CliError::Input(format!(
            "{} is a directory, not a disk image; pass the image file or block device",
            p.display()
        )));
    }
    // Records name their thin disk by path: make it absolute so any working directory
    // can resume the job.
    let p = &std::path::absolute(p).map_err(|e| CliError::Io {
        what: format!("cannot resolve the path {}", p.display()),
        source: e,
    })?;
    let block = is_block_device(p).unwrap_or(false);
    let record = match (&t.record, block) {
        (Some(r), _) => r.clone(),
        (None, true) => {
            return Err(CliError::Usage(format!(
                "{} is a block device: pass --record FILE to say where its seal record lives (a record cannot live beside a device node)",
                p.display()
            )))
        }
        (None, false) => default_record_path(p),
    };
    let thin_dir = t.thin_dir.as_deref().map(std::path::absolute).transpose();
    let thin_dir = thin_dir.map_err(|e| CliError::Io {
        what: "cannot resolve the --thin-dir path".into(),
        source: e,
    })?;
    if let Some(d) = &thin_dir {
        if !d.is_dir() {
            return Err(CliError::Input(format!(
                "--thin-dir {} is not a directory; create it or pick another",
                d.display()
            )));
        }
    }
    Ok(ImageStorage::new(p.clone(), record, thin_dir))
}

fn seal(a: &SealArgs, cli: &Cli) -> Result<(), CliError> {
    if a.keep_holes && matches!(a.profile, ProfileArg::Patent) {
        return Err(CliError::Usage(
            "--keep-holes applies to --profile secure only: the patent profile never encrypts, so its holes stay holes anyway; drop --keep-holes".into(),
        ));
    }
    let st = storage(&a.target)?;
    let opts = SealOptions {
        profile: match a.profile {
            ProfileArg::Secure => Profile::Secure,
            ProfileArg::Patent => Profile::Patent,
        },
        sector_size: a.sector_size,
        word_length: a.word_length,
        thin_slack_pct: a.thin_slack,
        placement: a.placement.map(|p| match p {
            PlacementArg::Patent => PlacementKind::Patent,
            PlacementArg::Feistel => PlacementKind::Feistel,
        }),
        strategy: a.strategy.clone(),
        master_key: match a.profile {
            ProfileArg::Secure => Some(keyfile::load(&keyfile::locate(
                a.target.key_file.as_deref(),
            ))?),
            ProfileArg::Patent => None,
        },
        memory_bytes: a.memory.bytes,
        keep_holes: a.keep_holes,
        dense: true,
    };
    let bar = Bar::new(cli.quiet);
    let t0 = Instant::now();
    let r = jobs::seal(&st, &opts, &bar);
    bar.finish();
    report("seal", st.image_path(), &r?, None, t0, cli);
    Ok(())
}

fn unseal(t: &Target, instant: bool, memory_bytes: u64, cli: &Cli) -> Result<(), CliError> {
    let st = storage(t)?;
    let rec = jobs::inspect(&st)?;
    let key = key_for(t, &rec)?;
    if instant || rec.phase == Phase::Migrating {
        return unseal_by_regions(&st, key.as_ref(), instant, memory_bytes, cli);
    }
    let bar = Bar::new(cli.quiet);
    let t0 = Instant::now();
    let r = jobs::unseal_with(&st, key.as_ref(), &bar, memory_bytes);
    bar.finish();
    report("unseal", st.image_path(), &r?, None, t0, cli);
    Ok(())
}

/// An instant reclaim's migration driven to its end here: resumed from phase `migrating`,
/// or (`start`, `--instant`) started on a sealed image. The move pass holds a window of
/// plaintext and reads the evacuation copy in runs for it: half the memory budget each.
fn unseal_by_regions(
    st: &ImageStorage,
    key: Option<&MasterKey>,
    start: bool,
    memory_bytes: u64,
    cli: &Cli,
) -> Result<(), CliError> {
    let bar = std::sync::Arc::new(Bar::new(cli.quiet));
    let opts = jobs::OfflineReclaim {
        start,
        window_bytes: (memory_bytes / 2).max(1),
    };
    let t0 = Instant::now();
    let r = jobs::reclaim_offline(st, key, bar.clone(), &opts);
    bar.finish();
    let r = r?;
    report("unseal", st.image_path(), &r.job, Some(&r), t0, cli);
    Ok(())
}

/// `by_regions`: the unseal was an instant reclaim's migration, driven here.
fn report(
    command: &str,
    image: &Path,
    r: &JobReport,
    by_regions: Option<&jobs::OfflineReport>,
    t0: Instant,
    cli: &Cli,
) {
    let secs = t0.elapsed().as_secs_f64();
    let rec = &r.record;
    if cli.json {
        let v = json!({
            "command": command,
            "image": image.display().to_string(),
            "outcome": r.outcome.name(),
            "resumed_from": r.resumed_from.map(|p| p.name()),
            "profile": rec.profile.name(),
            "placement": rec.placement,
            "strategy": rec.strategy,
            "sector_size": rec.sector_size,
            "sectors": rec.sectors,
            "thin_sectors": rec.thin_sectors,
            "keep_holes": rec.keep_holes,
            "dense_sectors": rec.dense.as_ref().map(|d| d.sectors),
            "digest": rec.digest,
            "plain_digest": rec.plain_digest,
            "sealed_digest": rec.sealed_digest,
            "seconds": secs,
            "instant": by_regions.is_some(),
            "regions": by_regions.map(|b| b.regions),
            "dirty_regions": by_regions.map(|b| b.dirty_regions),
        });
        out!("{v}");
        return;
    }
    let resumed = match (r.resumed_from, by_regions) {
        (Some(Phase::Migrating), _) => {
            " (finished the instant reclaim found in phase migrating)".to_string()
        }
        (Some(p), _) => format!(" (found an interrupted job in phase {})", p.name()),
        (None, Some(_)) => " (region by region, as an instant reclaim)".to_string(),
        (None, None) => String::new(),
    };
    let what = match r.outcome {
        jobs::Outcome::Sealed => "sealed",
        jobs::Outcome::Unsealed => "unsealed and verified",
        jobs::Outcome::SealRolledBack => "rolled back an interrupted seal; not sealed:",
        jobs::Outcome::UnsealRolledBack => "rolled back an interrupted unseal; still sealed:",
    };
    out!(
        "{what} {}{resumed}: {} sectors of {} bytes, {} profile, {} placement, {secs:.2} s",
        image.display(),
        rec.sectors,
        rec.sector_size,
        rec.profile.name(),
        rec.placement
    );
    if let Some(b) = by_regions.filter(|b| b.dirty_regions > 0) {
        out!(
            "  {} of {} regions were written by the disk's user during the reclaim: each was checked against the seal's region digest tree when it was moved, and holds the user's data since",
            b.dirty_regions,
            b.regions
        );
    }
}

fn verify(t: &Target, cli: &Cli) -> Result<(), CliError> {
    let st = storage(t)?;
    let rec = jobs::inspect(&st)?;
    if rec.phase == Phase::Migrating {
        return verify_migrating(t, &st, &rec, cli);
    }
    // The key is checked only when one is named: verifying the sealed bytes needs none.
    let named = t.key_file.is_some() || std::env::var_os(keyfile::KEY_FILE_ENV).is_some();
    let key = if named { key_for(t, &rec)? } else { None };
    let bar = Bar::new(cli.quiet);
    let r = jobs::verify(&st, key.as_ref(), &bar);
    bar.finish();
    let r = r?;
    if cli.json {
        let v = json!({
            "command": "verify",
            "image": t.path.display().to_string(),
            "intact": true,
            "sealed_digest": r.digest,
        });
        out!("{v}");
    } else {
        out!(
            "{} is intact: BLAKE3 {} matches its seal record",
            t.path.display(),
            r.digest
        );
    }
    Ok(())
}

/// `verify` of an instant reclaim nobody serves: each region against its leaf where the
/// moved map says it is. Needs the key in the secure profile (the map and tree are keyed).
fn verify_migrating(
    t: &Target,
    st: &ImageStorage,
    rec: &SealRecord,
    cli: &Cli,
) -> Result<(), CliError> {
    let key = key_for(t, rec)?;
    let bar = Bar::new(cli.quiet);
    let r = jobs::verify_migrating(st, key.as_ref(), &bar);
    bar.finish();
    let r = r?;
    let [sealed, evacuated, plain, dirty] = r.counts;
    let image = t.path.display().to_string();
    if cli.json {
        let v = json!({
            "command": "verify",
            "image": image,
            "intact": true,
            "phase": "migrating",
            "regions_checked": r.checked,
            "regions": {"sealed": sealed, "evacuated": evacuated, "plain": plain, "dirty": dirty},
        });
        out!("{v}");
        return Ok(());
    }
    out!(
        "{image} is being reclaimed (phase migrating) and its {} checked regions match the seal's region digest tree ({sealed} sealed, {evacuated} evacuated, {plain} moved to their plain place)",
        r.checked
    );
    if dirty > 0 {
        out!("  {dirty} regions changed by their user since the reclaim are not checked");
    }
    out!(
        "  if no daemon serves it any more, finish the reclaim with `pdguard image unseal {image}`"
    );
    Ok(())
}

/// The record as shown to a user: no seed (it replays the placement) and, of the wrapped
/// key, only its algorithm and master key id.
fn public_view(rec: &SealRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(rec).unwrap_or_default();
    if let Some(seed) = &rec.seed {
        v["seed"] = json!(format!("<withheld: {} bytes>", seed.len() / 2));
    }
    if rec.phase == Phase::Shredding {
        v["note"] = json!("shred interrupted; run pdguard image shred PATH --yes to finish");
    }
    if rec.phase == Phase::Migrating {
        v["note"] = json!("being reclaimed while served; if no daemon serves it any more, finish it with pdguard image unseal PATH (pdguard image verify PATH checks its regions)");
    }
    if let Some(w) = &rec.wrapped_key {
        v["wrapped_key"] = json!({
            "algorithm": w.algorithm,
            "master_key_id": w.master_key_id,
            "ciphertext": "<withheld>",
        });
    }
    if let Some(d) = &rec.dense {
        v["dense"] = json!({
            "sectors": d.sectors,
            "map": format!("<encrypted: {} bytes>", d.map.len() / 2),
        });
    }
    v
}

/// Refuse what `jobs::shred` would refuse from the record alone: an image that is not a
/// secure seal (the patent profile has no key to destroy), a shredded image, a job to finish.
fn shreddable(image: &str, rec: &SealRecord) -> Result<(), CliError> {
    if rec.profile != Profile::Secure {
        return Err(CliError::Input(format!(
            "{image} was sealed with the patent profile, which has no key to destroy; crypto-erase needs the secure profile (overwrite or delete the image instead)"
        )));
    }
    let image = image.to_string();
    match rec.phase {
        Phase::Sealed | Phase::Shredding => Ok(()),
        Phase::Shredded => Err(jobs::JobError::Shredded { image }.into()),
        Phase::Migrating => Err(jobs::JobError::ShredReclaiming { image }.into()),
        phase => Err(jobs::JobError::InProgress {
            image,
            phase: phase.name(),
            command: jobs::Direction::of(phase).command(),
        }
        .into()),
    }
}

fn shred(a: &ShredArgs, cli: &Cli) -> Result<(), CliError> {
    let target = a.located.target(a.key_file.as_deref());
    let st = storage(&target)?;
    let image = a.located.path.display().to_string();
    let rec = jobs::inspect(&st)?;
    if !a.yes {
        // What would refuse the shred is said before asking for the confirmation. (With
        // --yes the job checks the same after taking the image's lock.)
        shreddable(&image, &rec)?;
        return Err(CliError::Usage(format!(
            "shred destroys the key of {image} and with it the data, for good (even with the master key); run it again with --yes to confirm"
        )));
    }
    // With the master key the record is authenticated before anything is touched; without
    // one (a lost key) the shred still runs: destroying needs no key.
    let key = match key_for(&target, &rec) {
        Ok(k) => k,
        Err(CliError::Input(_)) => None,
        Err(e) => return Err(e),
    };
    let r = jobs::shred_report(&st, key.as_ref())?;
    let slot = st.key_slot_path();
    if cli.json {
        let v = json!({
            "command": "shred",
            "image": a.located.path.display().to_string(),
            "phase": r.record.phase.name(),
            "key_slot": slot.display().to_string(),
            "key_slot_overwritten": r.slot == jobs::SlotFate::Overwritten,
        });
        out!("{v}");
        return Ok(());
    }
    match r.slot {
        jobs::SlotFate::Overwritten => out!(
            "shredded {}: its key slot {} was overwritten with random bytes and deleted; the sealed data can no longer be decrypted",
            a.located.path.display(),
            slot.display()
        ),
        jobs::SlotFate::Absent => out!(
            "shredded {}: there was no key slot at {} to overwrite (an interrupted shred had already destroyed it, or it was removed), so nothing was destroyed now; the record is a tombstone",
            a.located.path.display(),
            slot.display()
        ),
    }
    Ok(())
}

fn migrate(a: &MigrateArgs, cli: &Cli) -> Result<(), CliError> {
    let target = a.located.target(a.key_file.as_deref());
    let st = storage(&target)?;
    let rec = jobs::inspect(&st)?;
    let key = key_for(&target, &rec)?;
    let r = jobs::migrate(&st, key.as_ref())?;
    let image = a.located.path.display();
    if cli.json {
        let v = json!({
            "command": "migrate",
            "image": image.to_string(),
            "from_version": r.from,
            "version": r.record.version,
            "migrated": r.migrated(),
        });
        out!("{v}");
    } else if r.migrated() {
        out!(
            "migrated the seal record of {image} from version {} to {}{}",
            r.from,
            r.record.version,
            match &r.record.key_slot {
                Some(_) => format!(
                    ": its wrapped key is in the key slot {} and the record has a MAC",
                    st.key_slot_path().display()
                ),
                None => String::new(),
            }
        );
    } else {
        out!(
            "the seal record of {image} is version {}: nothing to migrate",
            r.record.version
        );
    }
    Ok(())
}

fn inspect(t: &Target, cli: &Cli) -> Result<(), CliError> {
    let st = storage(t)?;
    let rec = jobs::inspect(&st)?;
    let v = public_view(&rec);
    if cli.json {
        out!("{v}");
        return Ok(());
    }
    out!("seal record {}", st.record_path().display());
    if rec.phase == Phase::Shredding {
        out!(
            "  shred interrupted; run `pdguard image shred {} --yes` to finish",
            t.path.display()
        );
    }
    if rec.phase == Phase::Migrating {
        out!(
            "  being reclaimed while served; if no daemon serves it any more, finish it with `pdguard image unseal {}`",
            t.path.display()
        );
    }
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            let text = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out!("  {k:<20} {text}");
        }
    }
    Ok(())
}
