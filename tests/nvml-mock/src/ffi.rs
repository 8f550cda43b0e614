//! The exported NVML entry points, with the exact C ABI of `nvml.h` (types taken from
//! `nvml-wrapper-sys`, the bindings `nvml-wrapper` loads us through).
//!
//! Each function does three things only: turn pointers into Rust values, ask `state`,
//! and write the answer through the caller's out-pointers. Every body runs inside
//! [`guarded`], because a panic unwinding into C is undefined behaviour; a panic becomes
//! `NVML_ERROR_UNKNOWN` instead.
//!
//! Handles are not pointers to anything: a device handle is a fixed base plus the GPU's
//! index, an event set handle another base plus a never-reused id. NVML handles are
//! opaque to callers, so nothing ever dereferences them, and a bogus one is refused with
//! `NVML_ERROR_INVALID_ARGUMENT` rather than crashing.

use std::ffi::{c_char, c_uint, c_ulong, c_ulonglong, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use nvml_wrapper_sys::bindings::{
    nvmlAffinityScope_t, nvmlDevice_t, nvmlEventData_t, nvmlEventSet_t,
    nvmlGpuLevel_enum_NVML_TOPOLOGY_INTERNAL as TOPOLOGY_INTERNAL,
    nvmlGpuLevel_enum_NVML_TOPOLOGY_SINGLE as TOPOLOGY_SINGLE,
    nvmlGpuLevel_enum_NVML_TOPOLOGY_SYSTEM as TOPOLOGY_SYSTEM, nvmlGpuTopologyLevel_t,
    nvmlMemory_t, nvmlMemory_v2_t, nvmlPciInfo_t,
    nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH as VERSION_MISMATCH,
    nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST as GPU_IS_LOST,
    nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE as INSUFFICIENT_SIZE,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT as INVALID_ARGUMENT,
    nvmlReturn_enum_NVML_ERROR_LIBRARY_NOT_FOUND as LIBRARY_NOT_FOUND,
    nvmlReturn_enum_NVML_ERROR_NOT_FOUND as NOT_FOUND,
    nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED as NOT_SUPPORTED,
    nvmlReturn_enum_NVML_ERROR_TIMEOUT as TIMEOUT,
    nvmlReturn_enum_NVML_ERROR_UNINITIALIZED as UNINITIALIZED,
    nvmlReturn_enum_NVML_ERROR_UNKNOWN as UNKNOWN, nvmlReturn_enum_NVML_SUCCESS as SUCCESS,
    nvmlReturn_t, NVML_AFFINITY_SCOPE_SOCKET,
};

use crate::config::{parse_bus_id, MockGpu, MAX_GPUS};
use crate::state::{self, Code, Delivery, SUPPORTED_EVENTS};

const DEVICE_HANDLE_BASE: usize = 0x4d00_0000;
const SET_HANDLE_BASE: usize = 0x5300_0000;

/// PCI id NVIDIA's vendor id in the low half; the device half is left 0 ("some NVIDIA GPU").
const PCI_DEVICE_ID: u32 = 0x0000_10de;

/// `nvmlMemory_v2`'s version stamp: `NVML_STRUCT_VERSION(Memory, 2)` from `nvml.h`.
const MEMORY_V2_VERSION: u32 = (std::mem::size_of::<nvmlMemory_v2_t>() as u32) | (2 << 24);

/// Runs an entry point's body; a panic becomes `NVML_ERROR_UNKNOWN` instead of unwinding
/// across the C ABI.
fn guarded(body: impl FnOnce() -> Result<(), Code>) -> nvmlReturn_t {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => SUCCESS,
        Ok(Err(code)) => code,
        Err(_) => UNKNOWN,
    }
}

fn device_handle(index: usize) -> nvmlDevice_t {
    (DEVICE_HANDLE_BASE + index) as nvmlDevice_t
}

fn device_index(handle: nvmlDevice_t) -> Result<usize, Code> {
    (handle as usize)
        .checked_sub(DEVICE_HANDLE_BASE)
        .filter(|index| *index < MAX_GPUS)
        .ok_or(INVALID_ARGUMENT)
}

fn set_handle(id: usize) -> nvmlEventSet_t {
    (SET_HANDLE_BASE + id) as nvmlEventSet_t
}

fn set_id(handle: nvmlEventSet_t) -> Result<usize, Code> {
    (handle as usize)
        .checked_sub(SET_HANDLE_BASE)
        .ok_or(INVALID_ARGUMENT)
}

/// Looks up the GPU behind `handle` and extracts what the call needs from it.
fn with_gpu<T>(handle: nvmlDevice_t, f: impl FnOnce(&MockGpu) -> T) -> Result<T, Code> {
    let index = device_index(handle)?;
    state::with_lib(|lib| lib.gpu(index).map(f))
}

/// Writes `value` through an out-pointer.
///
/// # Safety
/// `out` must be null or valid for a write of one `T`.
unsafe fn put<T>(out: *mut T, value: T) -> Result<(), Code> {
    if out.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    // SAFETY: `out` is non-null and the caller vouches that it is valid for a write.
    // `write` does not drop the old contents, which may be uninitialised.
    unsafe { out.write(value) };
    Ok(())
}

/// Copies `value` and a terminating NUL into a caller's buffer of `length` bytes.
///
/// # Safety
/// `buffer` must be null or valid for writes of `length` bytes.
unsafe fn put_str(buffer: *mut c_char, length: c_uint, value: &str) -> Result<(), Code> {
    if buffer.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    let bytes = value.as_bytes();
    if bytes.len() >= length as usize {
        return Err(INSUFFICIENT_SIZE);
    }
    // SAFETY: the caller vouches for `length` writable bytes at `buffer`, and we write
    // `bytes.len() + 1 <= length` of them; a Rust string never overlaps a C out-buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), buffer, bytes.len());
        buffer.add(bytes.len()).write(0);
    }
    Ok(())
}

/// `nvmlInit_v2`: reads the GPUs from the file named by `MUSTER_NVML_MOCK_CONFIG`.
/// Fails with `NVML_ERROR_LIBRARY_NOT_FOUND` when the variable or file is missing and
/// `NVML_ERROR_UNKNOWN` when the file is malformed.
#[no_mangle]
pub extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    guarded(state::init)
}

/// `nvmlInitWithFlags`: as [`nvmlInit_v2`]; the flags change nothing in the mock.
#[no_mangle]
pub extern "C" fn nvmlInitWithFlags(_flags: c_uint) -> nvmlReturn_t {
    guarded(state::init)
}

/// `nvmlShutdown`: the last matching call forgets the config and all event sets.
#[no_mangle]
pub extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    guarded(state::shutdown)
}

/// `nvmlErrorString`: a static description of a return code.
#[no_mangle]
pub extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static CStr = catch_unwind(|| error_string(result)).unwrap_or(c"Unknown Error");
    text.as_ptr()
}

fn error_string(result: nvmlReturn_t) -> &'static CStr {
    const TEXTS: [(nvmlReturn_t, &CStr); 10] = [
        (SUCCESS, c"Success"),
        (UNINITIALIZED, c"Uninitialized"),
        (INVALID_ARGUMENT, c"Invalid Argument"),
        (NOT_SUPPORTED, c"Not Supported"),
        (NOT_FOUND, c"Not Found"),
        (INSUFFICIENT_SIZE, c"Insufficient Size"),
        (TIMEOUT, c"Timeout"),
        (LIBRARY_NOT_FOUND, c"NVML Shared Library Not Found"),
        (GPU_IS_LOST, c"GPU is lost"),
        (VERSION_MISMATCH, c"Argument version mismatch"),
    ];
    TEXTS
        .iter()
        .find(|(code, _)| *code == result)
        .map_or(c"Unknown Error", |(_, text)| text)
}

/// `nvmlSystemGetDriverVersion`.
///
/// # Safety
/// `version` must be null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guarded(|| {
        let text = state::with_lib(|lib| Ok(lib.driver_version().to_owned()))?;
        // SAFETY: forwarded caller contract: `length` writable bytes at `version`.
        unsafe { put_str(version, length, &text) }
    })
}

/// `nvmlDeviceGetCount_v2`.
///
/// # Safety
/// `count` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(count: *mut c_uint) -> nvmlReturn_t {
    guarded(|| {
        let n = state::with_lib(|lib| Ok(lib.device_count()))?;
        let n = c_uint::try_from(n).map_err(|_| UNKNOWN)?;
        // SAFETY: forwarded caller contract for `count`.
        unsafe { put(count, n) }
    })
}

/// `nvmlDeviceGetHandleByIndex_v2`: fails with `NVML_ERROR_GPU_IS_LOST` for a lost GPU.
///
/// # Safety
/// `device` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guarded(|| {
        let index = index as usize;
        state::with_lib(|lib| lib.gpu(index).map(drop))?;
        // SAFETY: forwarded caller contract for `device`.
        unsafe { put(device, device_handle(index)) }
    })
}

/// `nvmlDeviceGetHandleByUUID`.
///
/// # Safety
/// `uuid` must be null or a NUL-terminated string; `device` null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    guarded(|| {
        if uuid.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        // SAFETY: non-null, and the caller vouches for a NUL-terminated string.
        let uuid = unsafe { CStr::from_ptr(uuid) };
        let uuid = uuid.to_str().map_err(|_| INVALID_ARGUMENT)?;
        let index = state::with_lib(|lib| lib.index_by_uuid(uuid))?;
        // SAFETY: forwarded caller contract for `device`.
        unsafe { put(device, device_handle(index)) }
    })
}

/// `nvmlDeviceGetIndex`.
///
/// # Safety
/// `index` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    guarded(|| {
        let i = device_index(device)?;
        with_gpu(device, |_| ())?;
        let i = c_uint::try_from(i).map_err(|_| INVALID_ARGUMENT)?;
        // SAFETY: forwarded caller contract for `index`.
        unsafe { put(index, i) }
    })
}

/// `nvmlDeviceGetName`.
///
/// # Safety
/// `name` must be null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guarded(|| {
        let text = with_gpu(device, |gpu| gpu.name.clone())?;
        // SAFETY: forwarded caller contract: `length` writable bytes at `name`.
        unsafe { put_str(name, length, &text) }
    })
}

/// `nvmlDeviceGetUUID`.
///
/// # Safety
/// `uuid` must be null or valid for writes of `length` bytes.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    guarded(|| {
        let text = with_gpu(device, |gpu| gpu.uuid.clone())?;
        // SAFETY: forwarded caller contract: `length` writable bytes at `uuid`.
        unsafe { put_str(uuid, length, &text) }
    })
}

/// `nvmlDeviceGetMemoryInfo`: all memory is free.
///
/// # Safety
/// `memory` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    guarded(|| {
        let total = with_gpu(device, |gpu| gpu.memory_bytes)?;
        let info = nvmlMemory_t {
            total,
            free: total,
            used: 0,
        };
        // SAFETY: forwarded caller contract for `memory`.
        unsafe { put(memory, info) }
    })
}

/// `nvmlDeviceGetMemoryInfo_v2` (what `nvml-wrapper` 0.11 calls): the caller must stamp
/// `version` as `nvml.h` says, or the call fails with `NVML_ERROR_ARGUMENT_VERSION_MISMATCH`.
///
/// # Safety
/// `memory` must be null or valid for reads and writes, with `version` initialised.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    guarded(|| {
        if memory.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        // SAFETY: non-null; the caller vouches that `version` is initialised (the
        // other fields may not be, so only this one is read).
        let version = unsafe { std::ptr::addr_of!((*memory).version).read() };
        if version != MEMORY_V2_VERSION {
            return Err(VERSION_MISMATCH);
        }
        let total = with_gpu(device, |gpu| gpu.memory_bytes)?;
        let info = nvmlMemory_v2_t {
            version,
            total,
            reserved: 0,
            free: total,
            used: 0,
        };
        // SAFETY: forwarded caller contract for `memory`.
        unsafe { put(memory, info) }
    })
}

/// `nvmlDeviceGetMinorNumber`.
///
/// # Safety
/// `minor` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMinorNumber(
    device: nvmlDevice_t,
    minor: *mut c_uint,
) -> nvmlReturn_t {
    guarded(|| {
        let value = with_gpu(device, |gpu| gpu.minor)?;
        // SAFETY: forwarded caller contract for `minor`.
        unsafe { put(minor, value) }
    })
}

fn pci_info(gpu: &MockGpu) -> Result<nvmlPciInfo_t, Code> {
    // The config was validated at init, so the bus id parses; stay defensive anyway.
    let address = parse_bus_id(&gpu.pci_bus_id).map_err(|_| UNKNOWN)?;
    let mut info = nvmlPciInfo_t {
        busIdLegacy: [0; 16],
        domain: address.domain,
        bus: address.bus,
        device: address.device,
        pciDeviceId: PCI_DEVICE_ID,
        pciSubSystemId: 0,
        busId: [0; 32],
    };
    // The legacy field has room for a 16-bit domain only, as in NVML.
    let legacy = format!(
        "{:04X}:{:02X}:{:02X}.{:X}",
        address.domain & 0xffff,
        address.bus,
        address.device,
        address.function
    );
    copy_into(&mut info.busIdLegacy, &legacy)?;
    copy_into(&mut info.busId, &gpu.pci_bus_id)?;
    Ok(info)
}

/// Copies `text` into a fixed C array, leaving at least one trailing NUL.
fn copy_into(array: &mut [c_char], text: &str) -> Result<(), Code> {
    if text.len() >= array.len() {
        return Err(INSUFFICIENT_SIZE);
    }
    for (slot, byte) in array.iter_mut().zip(text.bytes()) {
        *slot = byte as c_char;
    }
    Ok(())
}

/// `nvmlDeviceGetPciInfo_v3`.
///
/// # Safety
/// `pci` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    guarded(|| {
        let info = with_gpu(device, pci_info)??;
        // SAFETY: forwarded caller contract for `pci`.
        unsafe { put(pci, info) }
    })
}

/// `nvmlDeviceGetPciInfo_v2`: same struct, same answer.
///
/// # Safety
/// `pci` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v2(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    // SAFETY: same contract, forwarded unchanged.
    unsafe { nvmlDeviceGetPciInfo_v3(device, pci) }
}

/// `nvmlDeviceGetNumaNodeId`: `NVML_ERROR_NOT_SUPPORTED` when the config says -1.
///
/// # Safety
/// `node` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetNumaNodeId(
    device: nvmlDevice_t,
    node: *mut c_uint,
) -> nvmlReturn_t {
    guarded(|| {
        let numa = with_gpu(device, |gpu| gpu.numa_node)?;
        let numa = c_uint::try_from(numa).map_err(|_| NOT_SUPPORTED)?;
        // SAFETY: forwarded caller contract for `node`.
        unsafe { put(node, numa) }
    })
}

/// `nvmlDeviceGetMemoryAffinity`: a bitmask with the GPU's NUMA node set (none when the
/// config says -1). Socket scope answers the same as node scope.
///
/// # Safety
/// `node_set` must be null or valid for writes of `node_set_size` `c_ulong`s.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetMemoryAffinity(
    device: nvmlDevice_t,
    node_set_size: c_uint,
    node_set: *mut c_ulong,
    scope: nvmlAffinityScope_t,
) -> nvmlReturn_t {
    guarded(|| {
        if node_set.is_null() || node_set_size == 0 || scope > NVML_AFFINITY_SCOPE_SOCKET {
            return Err(INVALID_ARGUMENT);
        }
        let numa = with_gpu(device, |gpu| gpu.numa_node)?;
        // SAFETY: non-null, and the caller vouches for `node_set_size` writable words;
        // they are plain integers, so any bit pattern (including the old one) is valid.
        let words = unsafe { std::slice::from_raw_parts_mut(node_set, node_set_size as usize) };
        words.fill(0);
        if let Ok(node) = usize::try_from(numa) {
            let bits = c_ulong::BITS as usize;
            let word = words.get_mut(node / bits).ok_or(INSUFFICIENT_SIZE)?;
            *word |= 1 << (node % bits);
        }
        Ok(())
    })
}

/// `nvmlDeviceGetTopologyCommonAncestor`: `NVML_TOPOLOGY_INTERNAL` for a GPU and itself,
/// `NVML_TOPOLOGY_SINGLE` within an NVLink group, `NVML_TOPOLOGY_SYSTEM` otherwise.
///
/// # Safety
/// `path_info` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetTopologyCommonAncestor(
    device1: nvmlDevice_t,
    device2: nvmlDevice_t,
    path_info: *mut nvmlGpuTopologyLevel_t,
) -> nvmlReturn_t {
    guarded(|| {
        let (first, second) = (device_index(device1)?, device_index(device2)?);
        let group1 = with_gpu(device1, |gpu| gpu.nvlink_group)?;
        let group2 = with_gpu(device2, |gpu| gpu.nvlink_group)?;
        let level = match (group1, group2) {
            _ if first == second => TOPOLOGY_INTERNAL,
            (Some(a), Some(b)) if a == b => TOPOLOGY_SINGLE,
            _ => TOPOLOGY_SYSTEM,
        };
        // SAFETY: forwarded caller contract for `path_info`.
        unsafe { put(path_info, level) }
    })
}

/// `nvmlDeviceGetSupportedEventTypes`: XID critical errors and double-bit ECC errors.
///
/// # Safety
/// `event_types` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    event_types: *mut c_ulonglong,
) -> nvmlReturn_t {
    guarded(|| {
        with_gpu(device, |_| ())?;
        // SAFETY: forwarded caller contract for `event_types`.
        unsafe { put(event_types, SUPPORTED_EVENTS) }
    })
}

/// `nvmlEventSetCreate`.
///
/// # Safety
/// `set` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    guarded(|| {
        if set.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        let id = state::with_lib(|lib| Ok(lib.create_set()))?;
        // SAFETY: forwarded caller contract for `set`.
        unsafe { put(set, set_handle(id)) }
    })
}

/// `nvmlDeviceRegisterEvents`: only the types of [`nvmlDeviceGetSupportedEventTypes`].
#[no_mangle]
pub extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    event_types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    guarded(|| {
        let (index, id) = (device_index(device)?, set_id(set)?);
        state::with_lib(|lib| lib.register(id, index, event_types))
    })
}

/// `nvmlEventSetWait_v2`: the next injected fault for a registered GPU, waiting up to
/// `timeoutms`. A `lost` fault fails the wait with `NVML_ERROR_GPU_IS_LOST`.
///
/// # Safety
/// `data` must be null or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeoutms: c_uint,
) -> nvmlReturn_t {
    guarded(|| {
        let id = set_id(set)?;
        if data.is_null() {
            return Err(INVALID_ARGUMENT);
        }
        match state::wait_event(id, Duration::from_millis(u64::from(timeoutms)))? {
            Delivery::Lost => Err(GPU_IS_LOST),
            Delivery::Event {
                index,
                event_type,
                data: event_data,
            } => {
                let event = nvmlEventData_t {
                    device: device_handle(index),
                    eventType: event_type,
                    eventData: event_data,
                    // Not a MIG instance: NVML's "invalid" marker.
                    gpuInstanceId: u32::MAX,
                    computeInstanceId: u32::MAX,
                };
                // SAFETY: non-null (checked above) and the caller vouches it is writable.
                unsafe { put(data, event) }
            }
        }
    })
}

/// `nvmlEventSetFree`.
#[no_mangle]
pub extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    guarded(|| {
        let id = set_id(set)?;
        state::with_lib(|lib| lib.free_set(id))
    })
}
