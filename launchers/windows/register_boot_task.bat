@echo off
rem Register the Task Scheduler task that resumes so8t_exp training at logon (default) or,
rem with /startup, at system startup as SYSTEM (needs an elevated prompt). The same as
rem   python -m so8t_exp.boot install [boot.mode=startup]
rem which writes the task from XML: no time limit, runs on battery, normal priority.
rem   register_boot_task.bat [/startup] [/print] [/status] [/remove]
rem /print shows the XML without registering; /status what is registered and its last start;
rem /remove deletes the task. Asks nothing. Exit code: the command's (0 done, 1 schtasks
rem failed, 2 bad arguments); 9009 no Python found.
rem No blocks ( ... ) around lines that expand paths: a ")" in a folder name would end them.
setlocal EnableExtensions DisableDelayedExpansion

set "OLDCP="
for /f "tokens=2 delims=:" %%C in ('chcp') do set "OLDCP=%%C"
if defined OLDCP set "OLDCP=%OLDCP: =%"
if defined OLDCP set "OLDCP=%OLDCP:.=%"
chcp 65001 >nul
set "PYTHONUTF8=1"
set "PYTHONIOENCODING=utf-8"
set "PYTHONUNBUFFERED=1"

set "ACTION=install"
set "MODE="
:args
if "%~1"=="" goto :args_done
set "KNOWN="
if /i "%~1"=="/startup" set "MODE=boot.mode=startup"& set "KNOWN=1"
if /i "%~1"=="/print" set "ACTION=print"& set "KNOWN=1"
if /i "%~1"=="/status" set "ACTION=status"& set "KNOWN=1"
if /i "%~1"=="/remove" set "ACTION=remove"& set "KNOWN=1"
if not defined KNOWN goto :usage
shift
goto :args
:usage
echo usage: register_boot_task.bat [/startup] [/print ^| /status ^| /remove] 1>&2
set "CODE=2"
goto :end
:args_done

rem The project root from this file's own location, never the current directory.
for %%I in ("%~dp0..\..") do set "ROOT=%%~fI"

rem SO8T_PYTHON if set (quotes around it dropped: set VAR="..." is common), else the
rem project's virtual environment, else the py launcher.
set "PYARGS="
set "PYEXE="
if defined SO8T_PYTHON set "PYEXE=%SO8T_PYTHON:"=%"
if defined PYEXE goto :run
set "PYEXE=%ROOT%\.venv\Scripts\python.exe"
if exist "%PYEXE%" goto :run
set "PYEXE="
for %%P in (py.exe) do set "PYEXE=%%~$PATH:P"
set "PYARGS=-3"
if defined PYEXE goto :run
rem The message goes through a FOR variable: expanded after cmd has parsed & ( ) in the line.
set "MSG=register_boot_task: error: no Python found: neither %ROOT%\.venv\Scripts\python.exe nor the py launcher (py.exe) on PATH; create the venv (README, Windows) or set SO8T_PYTHON to a python.exe"
for %%M in ("%MSG%") do echo %%~M 1>&2
set "CODE=9009"
goto :end

:run
cd /d "%ROOT%"
"%PYEXE%" %PYARGS% -m so8t_exp.boot %ACTION% %MODE%
set "CODE=%ERRORLEVEL%"

:end
if defined OLDCP chcp %OLDCP% >nul 2>&1
exit /b %CODE%
