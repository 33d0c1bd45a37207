//! The region states of an instant reclaim and the durable **moved map** that holds them
//! (`docs/instant-reclaim.md`, sections 3 and 7). Pure: the states, their transitions and
//! the file's encoding; the engine does the I/O and the commits.
//!
//! Region `r` names one place of the image: plain region `r` (plaintext whose plain place
//! is there) and sealed store `r` (sealed sectors the sealed image keeps there).
//!
//! | state       | on disk | plain region at    | sealed store at      |
//! |-------------|---------|--------------------|----------------------|
//! | `sealed`    | 0       | its sealed places  | the image            |
//! | `evacuated` | 1       | its sealed places  | the evacuation copy  |
//! | `moving`    | never   | its sealed places  | the evacuation copy  |
//! | `plain`     | 2       | the image          | the evacuation copy  |
//! | `dirty`     | 3       | the image, written | the evacuation copy  |
//!
//! The file `RECORD.moved` holds two slots, slot `g mod 2` written by the commit of
//! generation `g`, each `L` bytes ([`slot_bytes`]; integers little-endian):
//!
//! | bytes        | content                                                        |
//! |--------------|----------------------------------------------------------------|
//! | 0..16        | magic `PDGUARD-MOVEDMP1` (the 1 is the format version)         |
//! | 16..20       | `region_bytes`, u32                                            |
//! | 20..36       | seal id, raw                                                   |
//! | 36..44       | `image_bytes`, u64                                             |
//! | 44..52       | `generation`, u64, at least 1                                  |
//! | 52..60       | `regions`, u64: `ceil(image_bytes / region_bytes)`             |
//! | 60..60+Q     | 2 bits per region (region `r`: byte `60 + r/4`, bits `2 (r%4)`); unused bits zero |
//! | 60+Q..92+Q   | `BLAKE3-keyed(map_key, bytes 0..60+Q)`                         |
//! | 92+Q..L      | zeros                                                          |
//!
//! `Q = ceil(regions / 4)`; `map_key = BLAKE3-derive_key("pdguard 2026-12 moved map v1",
//! K)`, `K` the record MAC key (secure profile) or empty (patent profile).

use std::fmt;

use thiserror::Error;
use zeroize::Zeroizing;

use crate::region_tree::{le_u32, le_u64, RegionLayout, RegionTreeError};

/// First 16 bytes of each slot.
pub const MAP_MAGIC: &[u8; 16] = b"PDGUARD-MOVEDMP1";
/// Suffix of the moved map beside its record: `disk.img.pdguard.moved`.
pub const MAP_SUFFIX: &str = ".moved";
/// Slots are rounded up to this many bytes.
pub const SLOT_GRAIN: usize = 4096;
/// Most regions a map may hold (16 TiB in regions of 4 KiB, 4 PiB in regions of 1 MiB):
/// a slot of at most 1 GiB, held in memory.
pub const MAX_REGIONS: u64 = 1 << 32;

const MAP_CONTEXT: &str = "pdguard 2026-12 moved map v1";
const HEAD: usize = 60;
const SUM: usize = 32;

/// Where a region stands in a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionState {
    /// Sealed store in the image; plain region at its sealed places.
    Sealed,
    /// Sealed store copied to the evacuation copy (authoritative there); plain region at its
    /// sealed places.
    Evacuated,
    /// Being moved (memory only: on disk it is still `evacuated`).
    Moving,
    /// Plain region at its plain place, as sealed (checked against its leaf).
    Plain,
    /// Plain region at its plain place, changed by user writes since its move.
    Dirty,
}

impl RegionState {
    pub const ALL: [Self; 5] = [
        Self::Sealed,
        Self::Evacuated,
        Self::Moving,
        Self::Plain,
        Self::Dirty,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Sealed => "sealed",
            Self::Evacuated => "evacuated",
            Self::Moving => "moving",
            Self::Plain => "plain",
            Self::Dirty => "dirty",
        }
    }

    /// What the moved map on disk says of a region in this state.
    pub fn durable(self) -> Self {
        match self {
            Self::Moving => Self::Evacuated,
            s => s,
        }
    }

    /// The 2-bit code of [`Self::durable`].
    fn code(self) -> u8 {
        match self.durable() {
            Self::Sealed => 0,
            Self::Evacuated | Self::Moving => 1,
            Self::Plain => 2,
            Self::Dirty => 3,
        }
    }

    fn from_code(code: u8) -> Self {
        match code & 3 {
            0 => Self::Sealed,
            1 => Self::Evacuated,
            2 => Self::Plain,
            _ => Self::Dirty,
        }
    }

    /// Plain region at its plain place: served from there.
    pub fn is_plain(self) -> bool {
        matches!(self, Self::Plain | Self::Dirty)
    }

    /// Where the sealed sectors of this region's sealed store are authoritative.
    pub fn sealed_store(self) -> SealedStore {
        match self {
            Self::Sealed => SealedStore::Image,
            _ => SealedStore::EvacuationCopy,
        }
    }
}

impl fmt::Display for RegionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a sealed sector is read from during a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedStore {
    /// The image, at the sealed sector's offset.
    Image,
    /// The evacuation copy, at the same offset.
    EvacuationCopy,
}

/// What happens to a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RegionEvent {
    /// Its sealed store was copied to the evacuation copy and fsynced.
    Evacuate,
    /// A move of it begins.
    StartMove,
    /// Its move wrote the plaintext as sealed and fsynced the image.
    CommitMove,
    /// Its move wrote the plaintext with a user write merged in, and fsynced the image.
    CommitMoveWritten,
    /// Its move failed (the region did not match its leaf, or I/O failed).
    AbortMove,
    /// A user read of it.
    Read,
    /// A user write to it.
    Write,
}

impl RegionEvent {
    pub const ALL: [Self; 7] = [
        Self::Evacuate,
        Self::StartMove,
        Self::CommitMove,
        Self::CommitMoveWritten,
        Self::AbortMove,
        Self::Read,
        Self::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Evacuate => "evacuate",
            Self::StartMove => "start move",
            Self::CommitMove => "commit move",
            Self::CommitMoveWritten => "commit move with a write",
            Self::AbortMove => "abort move",
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// What the caller must do after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The region is now in this state (the mover commits the map after its own fsync).
    To(RegionState),
    /// The region turns `dirty`: commit the map **before** issuing the write.
    MarkDirty,
    /// Serve the request at the plain place; nothing changes.
    Serve,
    /// Move the region first (evacuating it if `sealed`), then ask again.
    DemandMove,
    /// A move of the region is under way: wait for it to end, then ask again.
    WaitForMove,
}

/// An event that the region's state does not allow: a bug of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("a region in state {from} cannot take the event \"{}\"", event.name())]
pub struct TransitionError {
    pub from: RegionState,
    pub event: RegionEvent,
}

/// The transition table of `docs/instant-reclaim.md`, section 3.
pub fn next(from: RegionState, event: RegionEvent) -> Result<Step, TransitionError> {
    use RegionEvent as E;
    use RegionState as S;
    Ok(match (from, event) {
        (S::Sealed, E::Evacuate) => Step::To(S::Evacuated),
        (S::Evacuated, E::StartMove) => Step::To(S::Moving),
        (S::Moving, E::CommitMove) => Step::To(S::Plain),
        (S::Moving, E::CommitMoveWritten) => Step::To(S::Dirty),
        (S::Moving, E::AbortMove) => Step::To(S::Evacuated),
        (S::Sealed | S::Evacuated, E::Read | E::Write) => Step::DemandMove,
        (S::Moving, E::Read | E::Write) => Step::WaitForMove,
        (S::Plain, E::Write) => Step::MarkDirty,
        (S::Plain | S::Dirty, E::Read) | (S::Dirty, E::Write) => Step::Serve,
        (from, event) => return Err(TransitionError { from, event }),
    })
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MapError {
    #[error("{0}")]
    Layout(#[from] RegionTreeError),
    #[error("an image of {0} regions is more than a moved map holds ({MAX_REGIONS}); use larger regions")]
    TooManyRegions(u64),
    #[error("region {region} cannot take the event \"{}\": it is {}", .error.event.name(), .error.from)]
    Transition { region: u64, error: TransitionError },
    #[error("it is {len} bytes, not the {expected} bytes of two slots for {regions} regions")]
    Length {
        len: usize,
        expected: usize,
        regions: u64,
    },
    #[error("neither of its slots holds a valid map (slot 0: {0}; slot 1: {1})")]
    NoValidSlot(SlotRefusal, SlotRefusal),
    #[error("its slots hold generations {0} and {1}, which no sequence of commits writes")]
    NotConsecutive(u64, u64),
    #[error("it is at generation {0}, the last one: it cannot be committed again")]
    LastGeneration(u64),
}

/// Why one slot of a moved map file is not used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SlotRefusal {
    #[error("never written")]
    Empty,
    #[error("not a moved map (no PDGUARD-MOVEDMP1 magic)")]
    NotAMap,
    #[error("corrupt: {0}")]
    Corrupt(&'static str),
    #[error("of another seal: {0}")]
    Inconsistent(String),
}

/// What a moved map belongs to: its seal and how the image is cut into regions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapIdentity {
    pub seal_id: [u8; 16],
    pub layout: RegionLayout,
}

/// The key of a moved map's checksum, wiped when dropped.
pub struct MapKey(Zeroizing<[u8; 32]>);

impl MapKey {
    /// From the record MAC key (secure profile) or nothing (patent profile).
    pub fn new(material: Option<&[u8; 32]>) -> Self {
        let material: &[u8] = material.map_or(&[], |k| k.as_slice());
        Self(Zeroizing::new(blake3::derive_key(MAP_CONTEXT, material)))
    }
}

/// Bytes of one slot of the map of `regions` regions (`None`: more than [`MAX_REGIONS`]).
pub fn slot_bytes(regions: u64) -> Option<usize> {
    if regions > MAX_REGIONS {
        return None;
    }
    let states = usize::try_from(regions.div_ceil(4)).ok()?;
    let raw = HEAD.checked_add(states)?.checked_add(SUM)?;
    raw.checked_next_multiple_of(SLOT_GRAIN)
}

/// One commit to write: `bytes` at byte `offset` of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub generation: u64,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// The state of every region of one migration, and the generation last committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MovedMap {
    identity: MapIdentity,
    generation: u64,
    states: Vec<RegionState>,
}

impl MovedMap {
    /// A new migration's map: regions below `sealed_regions` start `sealed`, the rest (a
    /// dense seal's regions past its dense region, which hold no sealed data) `evacuated`.
    /// Generation 0: nothing committed yet.
    pub fn new(identity: MapIdentity, sealed_regions: u64) -> Result<Self, MapError> {
        let regions = identity.layout.regions();
        if regions > MAX_REGIONS {
            return Err(MapError::TooManyRegions(regions));
        }
        let states = (0..regions)
            .map(|r| {
                if r < sealed_regions {
                    RegionState::Sealed
                } else {
                    RegionState::Evacuated
                }
            })
            .collect();
        Ok(Self {
            identity,
            generation: 0,
            states,
        })
    }

    pub fn identity(&self) -> &MapIdentity {
        &self.identity
    }

    /// The generation of the last commit (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn regions(&self) -> u64 {
        self.states.len() as u64
    }

    fn index(&self, region: u64) -> Result<usize, MapError> {
        usize::try_from(region)
            .ok()
            .filter(|&r| r < self.states.len())
            .ok_or(MapError::Layout(RegionTreeError::OutOfRange {
                region,
                regions: self.regions(),
            }))
    }

    pub fn state(&self, region: u64) -> Result<RegionState, MapError> {
        Ok(self.states[self.index(region)?])
    }

    /// Apply `event` to `region` and say what the caller must do. `To` and `MarkDirty`
    /// change the state in memory; the caller commits.
    pub fn apply(&mut self, region: u64, event: RegionEvent) -> Result<Step, MapError> {
        let i = self.index(region)?;
        let step =
            next(self.states[i], event).map_err(|error| MapError::Transition { region, error })?;
        match step {
            Step::To(s) => self.states[i] = s,
            Step::MarkDirty => self.states[i] = RegionState::Dirty,
            Step::Serve | Step::DemandMove | Step::WaitForMove => {}
        }
        Ok(step)
    }

    /// Where the sealed sectors kept at region `region` of the image are authoritative.
    pub fn sealed_store(&self, region: u64) -> Result<SealedStore, MapError> {
        Ok(self.state(region)?.sealed_store())
    }

    /// Regions in `state`.
    pub fn count(&self, state: RegionState) -> u64 {
        self.states.iter().filter(|&&s| s == state).count() as u64
    }

    /// Every region is at its plain place: the migration's moves are done.
    pub fn is_complete(&self) -> bool {
        self.states.iter().all(|s| s.is_plain())
    }

    /// The next commit: this map (as on disk: `moving` is written `evacuated`) with the
    /// next generation, for its slot. Call [`Self::committed`] once it is durable.
    pub fn next_commit(&self, key: &MapKey) -> Result<Commit, MapError> {
        let generation = self
            .generation
            .checked_add(1)
            .ok_or(MapError::LastGeneration(self.generation))?;
        let len = self.slot_len()?;
        let mut bytes = Vec::with_capacity(len);
        bytes.extend_from_slice(MAP_MAGIC);
        bytes.extend_from_slice(&self.identity.layout.region_bytes().to_le_bytes());
        bytes.extend_from_slice(&self.identity.seal_id);
        bytes.extend_from_slice(&self.identity.layout.image_bytes().to_le_bytes());
        bytes.extend_from_slice(&generation.to_le_bytes());
        bytes.extend_from_slice(&self.regions().to_le_bytes());
        for four in self.states.chunks(4) {
            let byte = four
                .iter()
                .enumerate()
                .fold(0u8, |b, (k, s)| b | (s.code() << (2 * k)));
            bytes.push(byte);
        }
        let sum = blake3::keyed_hash(&key.0, &bytes);
        bytes.extend_from_slice(sum.as_bytes());
        bytes.resize(len, 0);
        Ok(Commit {
            generation,
            offset: (generation % 2) * len as u64,
            bytes,
        })
    }

    /// The commit of `generation` is durable.
    pub fn committed(&mut self, generation: u64) {
        self.generation = generation;
    }

    /// The whole file of a new migration: its first commit (generation 1) in slot 1, zeros
    /// in slot 0. Sets the generation to 1.
    pub fn create_file(&mut self, key: &MapKey) -> Result<Vec<u8>, MapError> {
        let first = self.next_commit(key)?;
        let mut file = vec![0u8; 2 * first.bytes.len()];
        let at = first.offset as usize;
        file[at..at + first.bytes.len()].copy_from_slice(&first.bytes);
        self.committed(first.generation);
        Ok(file)
    }

    fn slot_len(&self) -> Result<usize, MapError> {
        slot_bytes(self.regions()).ok_or(MapError::TooManyRegions(self.regions()))
    }

    /// Load the file of the migration `identity`: the valid slot of the higher generation.
    /// States read back `moving` never (it is not written).
    ///
    /// # Errors
    /// [`MapError::Length`] for a file that is not two slots long; [`MapError::NoValidSlot`]
    /// with each slot's reason; [`MapError::NotConsecutive`] for two valid slots that no
    /// sequence of commits leaves.
    pub fn load(file: &[u8], identity: &MapIdentity, key: &MapKey) -> Result<Self, MapError> {
        let regions = identity.layout.regions();
        let len = slot_bytes(regions).ok_or(MapError::TooManyRegions(regions))?;
        if Some(file.len()) != len.checked_mul(2) {
            return Err(MapError::Length {
                len: file.len(),
                expected: len.saturating_mul(2),
                regions,
            });
        }
        let (a, b) = file.split_at(len);
        match (
            parse_slot(a, 0, identity, key),
            parse_slot(b, 1, identity, key),
        ) {
            (Ok(a), Ok(b)) => {
                let (old, new) = if a.generation < b.generation {
                    (a, b)
                } else {
                    (b, a)
                };
                if old.generation.checked_add(1) != Some(new.generation) {
                    return Err(MapError::NotConsecutive(old.generation, new.generation));
                }
                Ok(new)
            }
            (Ok(m), Err(_)) | (Err(_), Ok(m)) => Ok(m),
            (Err(a), Err(b)) => Err(MapError::NoValidSlot(a, b)),
        }
    }
}

/// Parse slot `slot` (0 or 1) of the map of `identity`; every bound checked before use.
fn parse_slot(
    bytes: &[u8],
    slot: u64,
    identity: &MapIdentity,
    key: &MapKey,
) -> Result<MovedMap, SlotRefusal> {
    let regions = identity.layout.regions();
    let q = usize::try_from(regions.div_ceil(4)).map_err(|_| SlotRefusal::Corrupt("too large"))?;
    let end = HEAD + q;
    if bytes.len() < end + SUM {
        return Err(SlotRefusal::Corrupt("shorter than its regions need"));
    }
    if bytes.iter().all(|&b| b == 0) {
        return Err(SlotRefusal::Empty);
    }
    if bytes.get(..16) != Some(MAP_MAGIC.as_slice()) {
        return Err(SlotRefusal::NotAMap);
    }
    let sum = blake3::keyed_hash(&key.0, &bytes[..end]);
    if sum.as_bytes().as_slice() != &bytes[end..end + SUM] {
        return Err(SlotRefusal::Corrupt(
            "its checksum does not match (torn, damaged, edited, or made with another key)",
        ));
    }
    if bytes[end + SUM..].iter().any(|&b| b != 0) {
        return Err(SlotRefusal::Corrupt("its padding is not zeros"));
    }
    let region_bytes = le_u32(bytes, 16);
    let image_bytes = le_u64(bytes, 36);
    if bytes[20..36] != identity.seal_id
        || u64::from(region_bytes) != u64::from(identity.layout.region_bytes())
        || image_bytes != identity.layout.image_bytes()
    {
        return Err(SlotRefusal::Inconsistent(format!(
            "it is of seal {} with {image_bytes} bytes in regions of {region_bytes}",
            hex::encode(&bytes[20..36])
        )));
    }
    let generation = le_u64(bytes, 44);
    if generation == 0 || generation % 2 != slot {
        return Err(SlotRefusal::Corrupt(
            "its generation does not belong in this slot",
        ));
    }
    if le_u64(bytes, 52) != regions {
        return Err(SlotRefusal::Corrupt(
            "its region count does not match its sizes",
        ));
    }
    let packed = &bytes[HEAD..end];
    let used_bits = (regions % 4) * 2;
    if used_bits != 0 && packed.last().is_some_and(|&b| b >> used_bits != 0) {
        return Err(SlotRefusal::Corrupt("bits past its last region are set"));
    }
    let states = (0..regions)
        .map(|r| RegionState::from_code(packed[(r / 4) as usize] >> (2 * (r % 4))))
        .collect();
    Ok(MovedMap {
        identity: *identity,
        generation,
        states,
    })
}

#[cfg(test)]
#[path = "moved_map_tests.rs"]
mod tests;
