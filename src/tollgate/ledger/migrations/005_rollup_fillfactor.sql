-- The rollup is updated in place by every batch that touches a (day, user, key, provider,
-- model) group. Leaving 30 % of each page free lets those updates be HOT (the new row version
-- stays on its page, no index entries are added), which keeps the writer's rollup step cheap
-- and the table and its indexes from bloating. Applies to pages written from now on.
ALTER TABLE tollgate.daily_usage SET (fillfactor = 70);
