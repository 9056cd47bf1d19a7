-- ListTasks pages through tasks by creation time (keyset: created_at, task_uuid), newest or
-- oldest first, in one namespace or all of them. These indexes let each page read only its
-- own rows, however many tasks there are.
CREATE INDEX tasks_created_idx ON tasker.tasks (created_at, task_uuid);
CREATE INDEX tasks_namespace_created_idx ON tasker.tasks (namespace, created_at, task_uuid);
