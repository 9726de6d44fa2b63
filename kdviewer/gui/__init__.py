"""The desktop viewer (PySide6): the only room that imports Qt.

Entry points used by `kdviewer.cli`: `kdviewer.gui.app.main_gui(paths, bundle)` and
`kdviewer.gui.render.render_case(case, out, bundle, teacher, saliency)`. Import them lazily: importing
this package does not import Qt.
"""
