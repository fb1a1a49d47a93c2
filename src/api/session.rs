//! `wick.optim.adamw{...}`, `wick.session{...}` and the session object: step, eval, the step
//! loop, the learning rate.

use super::data::{BatchHandle, LoaderHandle};
use super::model::ModelHandle;
use super::opts::{table_arg, Opts};
use super::{check_stop, context, lock};
use crate::data::NextError;
use crate::host::checkpointing::{self, diverged_path};
use crate::host::signals::{self, Interrupted};
use crate::host::{Diverged, Refused};
use crate::train::{AdamW, AdamWConfig, Session, StepError};
use mlua::{AnyUserData, Lua, MetaMethod, UserData, UserDataMethods, Value};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct OptimHandle(pub AdamWConfig);
impl UserData for OptimHandle {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(format!("wick.optim.adamw{:?}", this.0))
        });
    }
}

#[derive(Clone)]
pub struct SessionHandle {
    pub session: Arc<Mutex<Session>>,
    pub model: ModelHandle,
}

const ADAMW_KEYS: &[&str] = &[
    "lr",
    "betas",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "clip",
];

pub fn adamw(_: &Lua, options: Option<Value>) -> mlua::Result<OptimHandle> {
    let mut c = AdamWConfig::default();
    let Some(options) = options.filter(|v| !v.is_nil()) else {
        return Ok(OptimHandle(c));
    };
    let o = Opts::new(
        "wick.optim.adamw",
        table_arg("wick.optim.adamw", options)?,
        ADAMW_KEYS,
        false,
    )?;
    c.lr = o.f64("lr")?.unwrap_or(c.lr);
    if let Value::Table(b) = o.value("betas")? {
        c.beta1 = b.get::<f64>(1).map_err(|_| {
            mlua::Error::runtime("option 'betas' of wick.optim.adamw must be {beta1, beta2}")
        })?;
        c.beta2 = b.get::<f64>(2).map_err(|_| {
            mlua::Error::runtime("option 'betas' of wick.optim.adamw must be {beta1, beta2}")
        })?;
    } else if !o.value("betas")?.is_nil() {
        return Err(mlua::Error::runtime(
            "option 'betas' of wick.optim.adamw must be {beta1, beta2}",
        ));
    }
    c.beta1 = o.f64("beta1")?.unwrap_or(c.beta1);
    c.beta2 = o.f64("beta2")?.unwrap_or(c.beta2);
    c.eps = o.f64("eps")?.unwrap_or(c.eps);
    c.weight_decay = o.f64("weight_decay")?.unwrap_or(c.weight_decay);
    if let Some(clip) = o.f64("clip")? {
        c.clip = if clip > 0.0 { Some(clip) } else { None };
    }
    for (name, v) in [("beta1", c.beta1), ("beta2", c.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(mlua::Error::runtime(format!(
                "wick.optim.adamw: {name} must be in [0, 1), got {v}"
            )));
        }
    }
    if !(c.lr.is_finite() && c.lr >= 0.0) {
        return Err(mlua::Error::runtime(format!(
            "wick.optim.adamw: lr must be a non-negative number, got {}",
            c.lr
        )));
    }
    Ok(OptimHandle(c))
}

const SESSION_KEYS: &[&str] = &["model", "optim", "lr", "resume"];

/// Load a checkpoint's weights, optimizer state and counters into a fresh session.
fn restore(
    session: &mut Session,
    model: &ModelHandle,
    ckpt: &crate::ckpt::Checkpoint,
) -> mlua::Result<()> {
    let diffs = model.model.config.differences(&ckpt.meta.model);
    if !diffs.is_empty() {
        return Err(mlua::Error::external(Refused(format!(
            "the model config differs from the checkpoint's: {}",
            diffs.join("; ")
        ))));
    }
    model
        .model
        .load_params(&ckpt.group("model."))
        .map_err(|e| {
            mlua::Error::external(Refused(format!("checkpoint {}: {e}", ckpt.path.display())))
        })?;
    // Checkpoints are device- and dtype-independent: moments come back onto this run's device
    // in the master weights' dtype, wherever and in whatever layout they were written.
    let device = model.model.device().clone();
    let master = model
        .model
        .params()
        .values()
        .next()
        .map(|v| v.dtype())
        .unwrap_or(candle_core::DType::F32);
    let to_dev = |m: std::collections::BTreeMap<String, candle_core::Tensor>| -> mlua::Result<_> {
        m.into_iter()
            .map(|(k, t)| {
                Ok((
                    k,
                    // A copy: AdamW updates moments in place, and these tensors are
                    // shared with the loaded checkpoint.
                    t.to_device(&device)
                        .and_then(|t| t.to_dtype(master))
                        .and_then(|t| t.copy())
                        .map_err(|e| mlua::Error::runtime(e.to_string()))?,
                ))
            })
            .collect::<mlua::Result<std::collections::BTreeMap<_, _>>>()
    };
    session.optim.m = to_dev(ckpt.group("optim.m."))?;
    session.optim.v = to_dev(ckpt.group("optim.v."))?;
    session.optim.step = ckpt.meta.optim_step;
    session.step = ckpt.meta.step;
    session.tokens_seen = ckpt.meta.tokens_seen;
    session.lr = ckpt.meta.lr;
    session.last_loss = ckpt.meta.loss;
    Ok(())
}

pub fn create(lua: &Lua, options: Value) -> mlua::Result<SessionHandle> {
    check_stop()?;
    let o = Opts::new(
        "wick.session",
        table_arg("wick.session", options)?,
        SESSION_KEYS,
        false,
    )?;
    let model = match o.value("model")? {
        Value::UserData(ud) => ud.borrow::<ModelHandle>().map(|m| m.clone()).map_err(|_| {
            mlua::Error::runtime(
                "option 'model' of wick.session must be a model from wick.model{...}",
            )
        })?,
        _ => {
            return Err(mlua::Error::runtime(
                "wick.session needs a model: wick.session{ model = wick.model{...} }",
            ))
        }
    };
    let optim = match o.value("optim")? {
        Value::Nil => AdamWConfig::default(),
        Value::UserData(ud) => ud
            .borrow::<OptimHandle>()
            .map(|h| h.0.clone())
            .map_err(|_| {
                mlua::Error::runtime("option 'optim' of wick.session must be wick.optim.adamw{...}")
            })?,
        _ => {
            return Err(mlua::Error::runtime(
                "option 'optim' of wick.session must be wick.optim.adamw{...}",
            ))
        }
    };
    let mut session = Session::new(model.model.clone(), AdamW::new(optim));
    if let Some(lr) = o.f64("lr")? {
        session.lr = lr;
    }
    let ctx = context(lua)?;
    let mut c = lock(&ctx);
    let explicit = match o.string("resume")? {
        Some(path) => Some(Arc::new(
            crate::ckpt::load(std::path::Path::new(&path))
                .map_err(|e| mlua::Error::runtime(format!("wick.session: {e}")))?,
        )),
        None => None,
    };
    if let Some(ckpt) = explicit.or_else(|| c.resume.clone().filter(|_| c.session.is_none())) {
        restore(&mut session, &model, &ckpt)?;
    }
    let session = Arc::new(Mutex::new(session));
    c.session = Some(session.clone());
    Ok(SessionHandle { session, model })
}

impl SessionHandle {
    fn lock(&self) -> mlua::Result<std::sync::MutexGuard<'_, Session>> {
        self.session.lock().map_err(|_| {
            mlua::Error::runtime(
                "the session is unusable: a previous host call crashed inside a step",
            )
        })
    }
}

fn step(lua: &Lua, this: &SessionHandle, batch: AnyUserData) -> mlua::Result<f64> {
    check_stop()?;
    let batch = batch
        .borrow::<BatchHandle>()
        .map_err(|_| mlua::Error::runtime("session:step expects a batch from loader:next()"))?;
    let step_start = std::time::Instant::now();
    let step_tokens = (batch.windows.batch * (batch.windows.width - 1)) as u64;
    let result = this.lock()?.train_step(&batch.windows);
    if result.is_ok() {
        batch.commit();
    }
    let ctx = context(lua)?;
    lock(&ctx).step_ms_total += step_start.elapsed().as_secs_f64() * 1e3;
    match result {
        Ok(loss) => {
            let (step, lr, tokens) = {
                let s = this.lock()?;
                (s.step, s.lr, s.tokens_seen)
            };
            let save_every = {
                let mut c = lock(&ctx);
                let (t0, tokens0) = *c
                    .loop_clock
                    .get_or_insert((step_start, tokens.saturating_sub(step_tokens)));
                let secs = t0.elapsed().as_secs_f64();
                let tps = if secs > 0.0 {
                    (tokens - tokens0) as f64 / secs
                } else {
                    0.0
                };
                let bad: u64 = c
                    .loaders
                    .iter()
                    .filter_map(|(_, l)| l.lock().ok().map(|l| l.stats_snapshot().bad_rows))
                    .sum();
                let extra = if bad > 0 {
                    format!(" ({bad} bad rows skipped)")
                } else {
                    String::new()
                };
                crate::progress::update(step, loss, lr, tps, &extra);
                c.opts.save_every
            };
            if save_every.is_some_and(|n| n > 0 && step % n == 0) {
                let state = crate::host::guard::read_state(lua);
                let mut c = lock(&ctx);
                let r = checkpointing::save(&mut c, state, "periodic", None, false)
                    .map_err(|e| mlua::Error::runtime(e.to_string()))?;
                crate::progress::warn(&checkpointing::describe(&r, "periodic"));
            }
            Ok(loss)
        }
        Err(StepError::Diverged { step, what }) => {
            let msg = format!(
                "training diverged at step {step}: {what}; lower the learning rate or clip harder"
            );
            let state = crate::host::guard::read_state(lua);
            let mut c = lock(&ctx);
            let path = diverged_path(&c.opts.ckpt_path);
            c.diverged = true;
            match checkpointing::save(&mut c, state, "diverged", Some(path), true) {
                Ok(r) => crate::progress::warn(&checkpointing::describe(&r, "diverged")),
                Err(e) => crate::progress::warn(&format!("could not keep the diverged state: {e}")),
            }
            Err(mlua::Error::external(Diverged(msg)))
        }
        Err(StepError::Failed(e)) => Err(mlua::Error::runtime(format!(
            "session:step: {}",
            crate::host::guard::strip_backtrace(&e.to_string())
        ))),
    }
}

fn eval(this: &SessionHandle, loader: AnyUserData, n: Option<usize>) -> mlua::Result<f64> {
    check_stop()?;
    let loader = loader.borrow::<LoaderHandle>().map_err(|_| {
        mlua::Error::runtime("session:eval expects a loader: session:eval(loader, n_batches)")
    })?;
    let n = n.unwrap_or(8).max(1);
    let batches = {
        let mut l = loader
            .0
            .lock()
            .map_err(|_| mlua::Error::runtime("loader is unusable after a crash"))?;
        l.eval_batches(n, &signals::stop_requested)
            .map_err(|e| match e {
                NextError::Interrupted => mlua::Error::external(Interrupted),
                NextError::Data(m) => mlua::Error::runtime(m),
            })?
    };
    let s = this.lock()?;
    let mut total = 0.0;
    for b in &batches {
        check_stop()?;
        s.check_windows(b).map_err(mlua::Error::runtime)?;
        total += s
            .eval_loss(b)
            .map_err(|e| mlua::Error::runtime(format!("session:eval: {e}")))?;
    }
    Ok(total / batches.len() as f64)
}

impl UserData for SessionHandle {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("global_step", |_, this| Ok(this.lock()?.step));
        fields.add_field_method_get("lr", |_, this| Ok(this.lock()?.lr));
        fields.add_field_method_set("lr", |_, this, lr: f64| {
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(mlua::Error::runtime(format!(
                    "session.lr must be a non-negative number, got {lr}"
                )));
            }
            this.lock()?.lr = lr;
            Ok(())
        });
        fields.add_field_method_get("last_loss", |_, this| Ok(this.lock()?.last_loss));
        fields.add_field_method_get("tokens_seen", |_, this| Ok(this.lock()?.tokens_seen));
        fields.add_field_method_get("grad_norm", |_, this| Ok(this.lock()?.last_grad_norm));
        fields.add_field_method_get("model", |_, this| Ok(this.model.clone()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("step", |lua, this, batch: AnyUserData| {
            step(lua, this, batch)
        });
        methods.add_method(
            "eval",
            |_, this, (loader, n): (AnyUserData, Option<usize>)| eval(this, loader, n),
        );
        // `for step in session:steps(N) do ... end`: the steps still to run up to N, so a
        // resumed run continues where the checkpoint stopped with no arithmetic in the recipe.
        methods.add_method("steps", |lua, this, total: u64| {
            check_stop()?;
            let first = this.lock()?.step;
            crate::progress::start(first, total);
            let mut next = first;
            lua.create_function_mut(move |_, ()| {
                check_stop()?;
                next += 1;
                Ok(if next <= total { Some(next) } else { None })
            })
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            let s = this.lock()?;
            Ok(format!(
                "wick.session(step={}, lr={:.3e}, last_loss={}, tokens_seen={})",
                s.step,
                s.lr,
                s.last_loss
                    .map(|l| format!("{l:.4}"))
                    .unwrap_or_else(|| "-".into()),
                s.tokens_seen
            ))
        });
    }
}
