"""Domain code shared by the server layers: settings, schema, blob store, models, data, aggregation."""
