//! An exponential moving average of a model's weights during training (the "EMA" weights
//! diffusion models are usually sampled from): after every optimiser step each averaged tensor
//! becomes `d · average + (1 − d) · weight`. The average smooths out the last steps' noise, which
//! a small model trained at a high learning rate is full of.

use candle_core::Result;
use candle_nn::VarMap;

/// Steps over which the decay ramps up to its value, as `(1 + n) / (RAMP + n)`: an average
/// started from random weights would otherwise remember them for ≈ 1 / (1 − d) steps.
const RAMP: f64 = 10.0;

/// The running average of the variables of one model.
pub(crate) struct WeightAverage {
    decay: f64,
    updates: u64,
    average: VarMap,
}

impl WeightAverage {
    /// An average with decay `decay` (in (0, 1)) that starts at the values in `average`, which
    /// must hold a variable for every name of the model it will follow.
    pub(crate) fn new(decay: f64, average: VarMap) -> Self {
        Self {
            decay,
            updates: 0,
            average,
        }
    }

    /// The averaged variables.
    pub(crate) fn weights(&self) -> &VarMap {
        &self.average
    }

    /// Moves the average towards the current values of `model`'s variables.
    pub(crate) fn update(&mut self, model: &VarMap) -> Result<()> {
        let n = self.updates as f64;
        let d = self.decay.min((1.0 + n) / (RAMP + n));
        self.updates += 1;
        let model = model
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("var map lock poisoned"))?;
        let average = self
            .average
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("var map lock poisoned"))?;
        for (name, var) in model.iter() {
            let avg = average.get(name).ok_or_else(|| {
                candle_core::Error::msg(format!("the weight average has no {name}"))
            })?;
            let next = (avg.as_tensor().affine(d, 0.0)? + var.as_tensor().affine(1.0 - d, 0.0)?)?;
            avg.set(&next.detach())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn map(v: f32) -> VarMap {
        let m = VarMap::new();
        let t = Tensor::full(v, 3, &Device::Cpu).unwrap();
        m.data()
            .lock()
            .unwrap()
            .insert("w".into(), Var::from_tensor(&t).unwrap());
        m
    }

    fn value(m: &VarMap) -> f32 {
        m.data().lock().unwrap()["w"]
            .as_tensor()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn the_average_follows_the_weights_at_the_ramped_decay() {
        let mut avg = WeightAverage::new(0.5, map(0.0));
        let model = map(1.0);
        // First update: decay min(0.5, 1/10) = 0.1, so 0.9 of the way.
        avg.update(&model).unwrap();
        assert!((value(avg.weights()) - 0.9).abs() < 1e-6);
        // Second: min(0.5, 2/11) ≈ 0.1818.
        avg.update(&model).unwrap();
        let want = 0.9 * (2.0 / 11.0) + (1.0 - 2.0 / 11.0);
        assert!((value(avg.weights()) - want).abs() < 1e-6);
        // The model's variable is untouched.
        assert_eq!(value(&model), 1.0);
    }

    #[test]
    fn a_missing_variable_is_an_error_not_a_panic() {
        let mut avg = WeightAverage::new(0.9, VarMap::new());
        assert!(avg.update(&map(1.0)).is_err());
    }
}
