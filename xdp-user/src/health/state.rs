//! The rise/fall state machine: `fall` consecutive failures take an up
//! backend down, `rise` consecutive successes bring a down one back.

use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

crate::display_as_written!(Health);

/// A change of health and the check result that caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub from: Health,
    pub to: Health,
}

#[derive(Clone, Debug)]
pub struct Tracker {
    pub state: Health,
    rise: u32,
    fall: u32,
    /// Consecutive results against the current state.
    streak: u32,
}

impl Tracker {
    pub fn new(state: Health, rise: u32, fall: u32) -> Self {
        Self {
            state,
            rise: rise.max(1),
            fall: fall.max(1),
            streak: 0,
        }
    }

    /// Record one check result; a transition if it completed a streak.
    pub fn record(&mut self, ok: bool) -> Option<Transition> {
        let (against, needed, to) = match self.state {
            Health::Up => (!ok, self.fall, Health::Down),
            Health::Down => (ok, self.rise, Health::Up),
        };
        if !against {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        if self.streak < needed {
            return None;
        }
        let from = self.state;
        self.state = to;
        self.streak = 0;
        Some(Transition { from, to })
    }

    /// Change rise/fall (a config reload) without losing the state.
    pub fn retune(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_in_a_row() {
        let mut t = Tracker::new(Health::Up, 2, 3);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None, "a success resets the streak");
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(
            t.record(false),
            Some(Transition {
                from: Health::Up,
                to: Health::Down
            })
        );
        assert_eq!(t.state, Health::Down);
    }

    #[test]
    fn rises_after_rise_successes_in_a_row() {
        let mut t = Tracker::new(Health::Down, 2, 3);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "a failure resets the streak");
        assert_eq!(t.record(true), None);
        assert_eq!(
            t.record(true),
            Some(Transition {
                from: Health::Down,
                to: Health::Up
            })
        );
        assert_eq!(t.record(true), None, "staying up is no transition");
    }

    #[test]
    fn rise_and_fall_of_one_flip_at_once() {
        let mut t = Tracker::new(Health::Up, 1, 1);
        assert!(t.record(false).is_some());
        assert!(t.record(true).is_some());
    }

    #[test]
    fn retune_keeps_state() {
        let mut t = Tracker::new(Health::Down, 5, 5);
        t.retune(1, 1);
        assert_eq!(t.state, Health::Down);
        assert!(t.record(true).is_some());
    }
}
