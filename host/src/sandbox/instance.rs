//! One live component instance: its store, its bindings and its
//! `net-device` resource; every call goes through `store::run`.

use super::bindings::{device_api, wit, VirtioNetDevice};
use super::engine::{DeviceComponent, Runtime};
use super::store::{new_store, run, InstanceData, SandboxError};
use wasmtime::component::ResourceAny;
use wasmtime::Store;

/// A live instance with its constructed device.
pub(crate) struct Instance {
    store: Store<InstanceData>,
    bindings: VirtioNetDevice,
    device: ResourceAny,
    fuel: u64,
}

impl Instance {
    pub fn new(
        runtime: &Runtime,
        component: &DeviceComponent,
        config: &wit::DeviceConfig,
    ) -> Result<Self, SandboxError> {
        let mut store = new_store(&runtime.engine, &runtime.limits);
        let fuel = runtime.limits.fuel_per_call;
        let instantiate = |e: SandboxError| SandboxError::Instantiate(e.to_string());
        let bindings = run(&mut store, fuel, "instantiate", |s| {
            component.pre.instantiate(s)
        })
        .map_err(instantiate)?;
        let device = run(&mut store, fuel, "constructor", |s| {
            bindings
                .sandnic_device_device()
                .net_device()
                .call_constructor(s, *config)
        })
        .map_err(instantiate)?;
        Ok(Self {
            store,
            bindings,
            device,
            fuel,
        })
    }

    /// One call into the component under the per-call limits.
    pub fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(
            device_api::GuestNetDevice<'_>,
            &mut Store<InstanceData>,
            ResourceAny,
        ) -> wasmtime::Result<R>,
    ) -> Result<R, SandboxError> {
        let (bindings, device) = (&self.bindings, self.device);
        run(&mut self.store, self.fuel, call, |s| {
            f(bindings.sandnic_device_device().net_device(), s, device)
        })
    }

    /// A call to one of the interface's free functions (`describe`).
    pub fn call_free<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&device_api::Guest, &mut Store<InstanceData>) -> wasmtime::Result<R>,
    ) -> Result<R, SandboxError> {
        let bindings = &self.bindings;
        run(&mut self.store, self.fuel, call, |s| {
            f(bindings.sandnic_device_device(), s)
        })
    }
}
