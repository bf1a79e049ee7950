"""Which worker trains what when: profiles, plans, the scheduler, the simulator."""
