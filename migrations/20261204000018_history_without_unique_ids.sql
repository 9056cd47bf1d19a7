-- Storage per finished step (issue 24, item 5), continued: the history's ids are an identity
-- (unique by construction) that nothing looks up one by one; a step's rows are read in order
-- through (step_uuid, id). The unique B-tree on id cost every transition an index insert and
-- every finished step about 70 bytes (four rows). A BRIN index keeps "the rows after id N"
-- (how the benchmark reads what happened in an interval) a read of the table's tail, at a few
-- pages for the whole table.
ALTER TABLE tasker.step_transitions DROP CONSTRAINT step_transitions_pkey;
CREATE INDEX step_transitions_id_brin ON tasker.step_transitions USING brin (id);
